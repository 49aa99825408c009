// GPT-Image-Edit frontend extension.
//
// * Pad To Ratio shows, live, the ratio the connected image will snap to and the padded size.
// * Fusion Connector shows only the inputs its mode uses, read from the server's fusion-mode table:
//   qwen_features is hidden in a mode that does not need Qwen (or greyed and marked unused while a
//   link is still plugged in), and text_features says when only its CLIP("") pooled vector is read
//   (pooled from the empty prompt, no T5 tokens).
// * Padding Check, Rewrite Instruction, Answer and Conversation Turn show the text they return (the
//   frontend shows no `ui.text` of its own): the verdict, the rewrite, the answer, the turn's route.
//
// This file holds no rule of its own: the pack's routes answer from gie_core (gie_core/engine/web_rules.py).
// GET /gie/rules gives the fusion-mode table (read once); GET /gie/pad_plan gives the pad record the
// Pad To Ratio node will make, computed by the node's own function. When the server answers an error or
// cannot be reached, the node says so in a line; nothing here throws.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// --- the server's answers ------------------------------------------------------------------------

const RULES_ROUTE = "/gie/rules";
const PAD_PLAN_ROUTE = "/gie/pad_plan";
const PAD_PLAN_DELAY_MS = 150; // ask once the widgets stop changing

/** GET a route of the pack: `{ body }`, or `{ error }` with a short reason. Never throws. */
export async function getJson(route) {
  let res;
  try {
    res = await api.fetchApi(route);
  } catch (e) {
    return { error: `server unreachable (${e?.message ?? e})` };
  }
  let body = null;
  try { body = await res.json(); } catch { /* not JSON: said below */ }
  if (!res.ok) return { error: body?.error ?? `server answered ${res.status} for ${route.split("?")[0]}` };
  if (body === null) return { error: `server sent no JSON for ${route.split("?")[0]}` };
  return { body };
}

let rulesAnswer = null; // a promise of getJson(RULES_ROUTE); forgotten after an error, so it is asked again

/** The rules (`{ fusion_modes, ratio_sets, placements }`), or `{ error }`: fetched once. */
export function loadRules() {
  rulesAnswer ??= getJson(RULES_ROUTE).then((answer) => {
    if (answer.error) rulesAnswer = null;
    return answer;
  });
  return rulesAnswer;
}

// --- read-only text under a node's widgets (never serialised) ----------------------------------

const LINE_HEIGHT = 16;

/** Greedy word wrap of `text` (may hold newlines) to `width` pixels. */
function wrapLines(ctx, text, width) {
  const out = [];
  for (const para of String(text).split("\n")) {
    let line = "";
    for (const word of para.split(" ")) {
      const next = line ? `${line} ${word}` : word;
      if (line && ctx.measureText(next).width > width) { out.push(line); line = word; } else line = next;
    }
    out.push(line);
  }
  return out;
}

/**
 * A canvas widget that shows `textOf(node)`, wrapped. It is left out of widgets_values (UI format)
 * and out of the API prompt, so workflows and prompts are the same with or without this extension.
 */
function addInfoWidget(node, name, textOf) {
  const widget = {
    name,
    type: "gie_info",
    value: "",
    serialize: false,
    options: { serialize: false },
    lineCount: 2,
    computeSize(width) { return [width, this.lineCount * LINE_HEIGHT + 8]; },
    draw(ctx, node, width, y) {
      this.value = textOf(node);
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.textAlign = "left";
      ctx.fillStyle = globalThis.LiteGraph?.NODE_TEXT_COLOR ?? "#ccc";
      const lines = wrapLines(ctx, this.value, width - 30);
      lines.forEach((line, i) => ctx.fillText(line, 15, y + LINE_HEIGHT * (i + 1)));
      ctx.restore();
      if (lines.length !== this.lineCount) { // grow (or shrink) the node to the text, next frame
        this.lineCount = lines.length;
        requestAnimationFrame(() => fitHeight(node));
      }
    },
  };
  node.addCustomWidget(widget);
  fitHeight(node);
  return widget;
}

/** Make the node at least as tall as its content (a saved workflow may carry an older size). */
function fitHeight(node) {
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  node.setDirtyCanvas(true, true);
}

// --- Pad To Ratio: the snap it will make, live ---------------------------------------------------

const widgetValue = (node, name) => node.widgets?.find((w) => w.name === name)?.value;

/** Width and height of the image feeding `image`: a loader's preview (through legacy Reroutes). */
function upstreamImageSize(node) {
  let src = node.getInputNode?.(node.findInputSlot("image"));
  for (let hops = 0; src && hops < 16; hops++) {
    const img = src.imgs?.[src.imageIndex ?? 0] ?? src.imgs?.[0];
    if (img?.naturalWidth) return [img.naturalWidth, img.naturalHeight];
    if (src.type !== "Reroute") break;
    src = src.getInputNode(0);
  }
  return null;
}

/**
 * The two preview lines of a pad record (the answer of GET /gie/pad_plan), e.g.
 * "snaps to 3:2 -> 1536x1024" and "from 1536x1000: +pad top 12, bottom 12 px".
 */
export function describePlan(plan) {
  const sides = ["left", "right", "top", "bottom"].filter((s) => plan[s]).map((s) => `${s} ${plan[s]}`);
  return `snaps to ${plan.ratio[0]}:${plan.ratio[1]} -> ${plan.padded_width}x${plan.padded_height}\n`
    + `from ${plan.original_width}x${plan.original_height}: `
    + (sides.length ? `+pad ${sides.join(", ")} px` : "already at the ratio, no padding");
}

/** GET /gie/pad_plan for an image size and the node's widget values (a missing one: the server's default). */
function padPlanRoute(node, [width, height]) {
  const params = new URLSearchParams({ width, height });
  for (const name of ["ratios", "custom_ratios", "placement"]) {
    const value = widgetValue(node, name);
    if (value != null) params.set(name, String(value));
  }
  return `${PAD_PLAN_ROUTE}?${params}`;
}

/** Ask the server for `route` once the widgets stop changing; only the latest question's answer is shown. */
function askPadPlan(node, route) {
  node.giePlanRoute = route;
  clearTimeout(node.giePlanTimer);
  node.giePlanTimer = setTimeout(async () => {
    const { body, error } = await getJson(route);
    if (node.giePlanRoute !== route) return; // the widgets changed meanwhile: a newer question is out
    node.giePlanText = error ? `snap preview: ${error}` : describePlan(body);
    node.setDirtyCanvas(true, true);
  }, PAD_PLAN_DELAY_MS);
}

/** The preview text, checked on every draw (images load asynchronously); the server is asked on a change. */
function snapText(node) {
  const size = upstreamImageSize(node);
  let text;
  if (!size) {
    node.giePlanRoute = node.giePlanText = null;
    text = "snap preview: connect a Load Image\n(the sizes show once its image loads)";
  } else {
    const route = padPlanRoute(node, size);
    if (route !== node.giePlanRoute) askPadPlan(node, route);
    text = node.giePlanText ?? "snap preview: asking the server";
  }
  node.gieSnapText = text; // read by the browser test
  return text;
}

// --- Padding Check, Rewrite Instruction, Answer, Conversation Turn: show the text the node returned ---

const SHOWS_RESULT = ["GIEPaddingCheck", "GIERewriteInstruction", "GIEAnswer", "GIEConversationTurn"];

function showExecutedText(node) {
  const widget = addInfoWidget(node, "gie_result", (n) => n.gieExecutedText ?? "(runs to show its result here)");
  widget.lineCount = 1;
  const onExecuted = node.onExecuted;
  node.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    if (message?.text) this.gieExecutedText = [].concat(message.text).join("\n");
    this.setDirtyCanvas(true, true);
  };
}

// --- Fusion Connector: show only the inputs the mode uses ----------------------------------------

const QWEN = "qwen_features", TEXT = "text_features", QWEN_TYPE = "GIE_QWEN_FEATURES";

/**
 * How a Fusion Connector in `mode` shows its feature inputs, from the mode's row of the server's
 * fusion-mode table (`table`): whether qwen_features is read (needs_qwen) and the label of
 * text_features (only CLIP("") pooled is read when the mode pools from the empty prompt and has no
 * T5 tokens). A mode the table does not have shows everything, unlabelled. No mode is named here.
 */
export function fusionInputLook(mode, table) {
  const row = table && Object.hasOwn(table, mode) ? table[mode] : null;
  if (!row) return { usesQwen: true, textLabel: null };
  const clipEmptyOnly = row.pooled_from === "empty" && !row.needs_t5;
  return { usesQwen: row.needs_qwen, textLabel: clipEmptyOnly ? `${TEXT} (CLIP '' only)` : null };
}

let fusionModes = null; // the table of GET /gie/rules, once it has arrived

const UNUSED_COLOR = "#555";

/** Label and colour of a slot; null removes them, so nothing stale is saved with the workflow. */
function setLook(slot, label, color) {
  if (label) slot.label = label; else delete slot.label;
  if (color) slot.color_on = slot.color_off = color; else { delete slot.color_on; delete slot.color_off; }
}

/** Show the node's inputs as its mode's row says; until the table has arrived, leave them as they are. */
function applyFusionMode(node) {
  if (!fusionModes) return void refreshFusionMode(node);
  const mode = widgetValue(node, "mode");
  const { usesQwen, textLabel } = fusionInputLook(mode, fusionModes);
  let qi = node.findInputSlot(QWEN);
  if (!usesQwen && qi >= 0 && node.inputs[qi].link == null) {
    node.removeInput(qi); // hidden: nothing plugged in and the mode does not read it
    qi = -1;
  } else if (usesQwen && qi < 0) {
    node.addInput(QWEN, QWEN_TYPE);
    qi = node.findInputSlot(QWEN);
  }
  if (qi >= 0) {
    // still plugged in while unused: keep the link (the prompt stays as saved) but grey it out
    const slot = node.inputs[qi];
    setLook(slot, usesQwen ? null : `${QWEN} (unused in ${mode})`, usesQwen ? null : UNUSED_COLOR);
    const link = node.graph?.getLink?.(slot.link);
    if (link) link.color = usesQwen ? undefined : UNUSED_COLOR;
  }
  const ti = node.findInputSlot(TEXT);
  if (ti >= 0) setLook(node.inputs[ti], textLabel, null);
  node.gieHiddenInputs = usesQwen || qi >= 0 ? [] : [QWEN]; // read by the browser test
  node.gieUnusedInputs = !usesQwen && qi >= 0 ? [QWEN] : [];
  node.setDirtyCanvas(true, true);
}

/** Fetch the rules (once for all nodes), then apply them; if they cannot be read, the node says why. */
function refreshFusionMode(node) {
  loadRules().then(({ body, error }) => {
    if (body) fusionModes = body.fusion_modes;
    node.gieRulesError = error ?? null;
    const at = node.widgets?.findIndex((w) => w.name === "gie_rules_status") ?? -1;
    if (error && at < 0) {
      addInfoWidget(node, "gie_rules_status", (n) => `inputs shown as saved: ${n.gieRulesError ?? ""}`).lineCount = 1;
    } else if (!error && at >= 0) {
      node.widgets.splice(at, 1);
    }
    if (fusionModes) applyFusionMode(node);
    node.setDirtyCanvas(true, true);
  });
}

function setupFusionConnector(node) {
  const mode = node.widgets?.find((w) => w.name === "mode");
  const callback = mode?.callback;
  if (mode) mode.callback = function (...args) { const r = callback?.apply(this, args); applyFusionMode(node); return r; };
  // disconnecting can hide the slot: do it after litegraph has finished with the link
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    const r = onConnectionsChange?.apply(this, args);
    queueMicrotask(() => applyFusionMode(node));
    return r;
  };
  applyFusionMode(node);
}

// --- registration ----------------------------------------------------------------------------

app.registerExtension({
  name: "gpt_image_edit.ui",
  nodeCreated(node) {
    if (node.comfyClass === "GIEPadToRatio") addInfoWidget(node, "gie_snap_preview", snapText);
    if (node.comfyClass === "GIEFusionConnector") setupFusionConnector(node);
    if (SHOWS_RESULT.includes(node.comfyClass)) showExecutedText(node);
  },
  // a loaded workflow restores its saved size and widget values (without callbacks): fit and re-apply
  loadedGraphNode(node) {
    if (node.widgets?.some((w) => w.type === "gie_info")) fitHeight(node);
    if (node.comfyClass === "GIEFusionConnector") applyFusionMode(node);
  },
});
