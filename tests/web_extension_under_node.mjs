// Runs web/gie.js (its ComfyUI imports replaced by stubs) on stand-in litegraph nodes, against the
// server at argv[3] (the pack's routes under /api), and prints what the nodes show as JSON.
// Used by tests/test_web_extension.py. argv: module URL, server base URL, JSON list of pad cases
// [width, height, ratios, custom_ratios, placement].
const [moduleUrl, base, casesJson] = process.argv.slice(2);
const cases = JSON.parse(casesJson);

const registered = [];
let asked = []; // routes the extension fetched
let reachable = true;
globalThis.__gieApp = { registerExtension: (e) => registered.push(e) };
globalThis.__gieFetchApi = async (route, options) => { // as ComfyUI's api.fetchApi: the route under /api
  asked.push(route);
  if (!reachable) throw new TypeError("fetch failed");
  return fetch(`${base}/api${route}`, options);
};
globalThis.requestAnimationFrame = (f) => setTimeout(f, 0);

const m = await import(moduleUrl);
const ext = registered[0];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const ctx = { save() {}, restore() {}, fillText() {}, measureText: (t) => ({ width: 6 * t.length }) };

function makeNode(comfyClass, widgets, inputs, upstream = null) {
  const links = { 1: { color: undefined }, 2: { color: undefined } };
  return {
    comfyClass, size: [300, 100], graph: { getLink: (id) => links[id] },
    widgets: widgets.map(([name, value]) => ({ name, value })),
    inputs: inputs.map(([name, link]) => ({ name, type: "ANY", link })),
    addCustomWidget(w) { this.widgets.push(w); return w; },
    computeSize() { return [300, 30 + 20 * this.widgets.length]; },
    setSize(s) { this.size = s; },
    setDirtyCanvas() {},
    findInputSlot(name) { return this.inputs.findIndex((s) => s.name === name); },
    getInputNode(slot) { return slot >= 0 && this.inputs[slot]?.link != null ? upstream : null; },
    removeInput(i) { this.inputs.splice(i, 1); },
    addInput(name, type) { this.inputs.push({ name, type, link: null }); },
  };
}

const draw = (node) => node.widgets.filter((w) => w.type === "gie_info").forEach((w) => w.draw(ctx, node, 300, 0));

function padNode(width, height, ratios, custom, placement) {
  const image = width ? { imgs: [{ naturalWidth: width, naturalHeight: height }] } : null;
  const node = makeNode("GIEPadToRatio", [["ratios", ratios], ["pad_color", "white"], ["placement", placement],
    ["custom_ratios", custom]], [["image", image ? 1 : null]], image);
  ext.nodeCreated(node);
  return node;
}

/** Draw until the preview is the server's answer (not the waiting line). */
async function settled(node) {
  for (let i = 0; i < 200; i++) {
    draw(node);
    if (node.giePlanText != null) break;
    await sleep(20);
  }
  draw(node);
  return node.gieSnapText;
}

const out = { registered: registered.map((e) => e.name) };

// Pad To Ratio, every case at once
const pads = cases.map((c) => padNode(...c));
out.pad = await Promise.all(pads.map(settled));

// quick changes: only the last values are asked, once
asked = [];
const quick = padNode(80, 48, "default", "", "center");
for (const [name, value] of [["custom_ratios", "4:3"], ["placement", "left"], ["custom_ratios", "16:9, 1:1"], ["placement", "top"]]) {
  quick.widgets.find((w) => w.name === name).value = value;
  draw(quick);
}
out.debounced = { text: await settled(quick), asked: asked.filter((r) => r.startsWith("/gie/pad_plan")).length };
out.no_image = await (async () => { const n = padNode(0, 0, "default", "", "center"); draw(n); return n.gieSnapText; })();
out.preview_not_saved = quick.widgets.filter((w) => w.type === "gie_info").every((w) => w.serialize === false);

// Fusion Connector, per mode of the served table, with qwen_features plugged in and not
const rules = await (await fetch(`${base}/api/gie/rules`)).json();
const look = (n) => ({
  inputs: n.inputs.map((s) => [s.name, s.label ?? null]),
  hidden: n.gieHiddenInputs, unused: n.gieUnusedInputs,
  link_color: n.inputs.find((s) => s.name === "qwen_features")?.link != null ? n.graph.getLink(1).color ?? null : null,
});
async function connector(mode, qwenLink) {
  const n = makeNode("GIEFusionConnector", [["mode", mode]], [["qwen_features", qwenLink], ["text_features", 2]]);
  ext.nodeCreated(n);
  for (let i = 0; i < 100 && n.gieHiddenInputs === undefined; i++) await sleep(10);
  return n;
}
out.fusion = {};
for (const mode of Object.keys(rules.fusion_modes)) {
  out.fusion[mode] = { plugged: look(await connector(mode, 1)), unplugged: look(await connector(mode, null)) };
}
const modes = Object.entries(rules.fusion_modes);
const withQwen = modes.find(([, row]) => row.needs_qwen)[0], withoutQwen = modes.find(([, row]) => !row.needs_qwen)[0];
const sw = await connector(withoutQwen, null);
out.switch = [];
for (const mode of [withQwen, withoutQwen]) {
  const w = sw.widgets.find((x) => x.name === "mode");
  w.value = mode;
  w.callback?.(mode);
  out.switch.push(sw.gieHiddenInputs);
}

// the server cannot be reached: a fresh copy of the extension (no rules fetched yet)
reachable = false;
const pad = padNode(80, 48, "default", "", "top");
out.unreachable = await settled(pad);
registered.length = 0;
await import(`${moduleUrl}?unreachable`);
const fresh = registered[0];
const n = makeNode("GIEFusionConnector", [["mode", withoutQwen]], [["qwen_features", null], ["text_features", 2]]);
fresh.nodeCreated(n);
for (let i = 0; i < 100 && n.gieRulesError === undefined; i++) await sleep(10);
draw(n);
out.fusion_unreachable = {
  error: n.gieRulesError, inputs: n.inputs.map((s) => s.name),
  shown: n.widgets.find((w) => w.name === "gie_rules_status")?.value ?? null,
};
console.log(JSON.stringify(out));
