// GPT-Image-Edit frontend extension.
//
// * Pad To Ratio shows, live, the ratio the connected image will snap to and the padded size.
// * Fusion Connector shows only the inputs its mode uses, read from FUSION_MODE_TABLE (a copy of
//   gie_core/engine/modes.py): qwen_features is hidden in a mode that does not need Qwen (or greyed and
//   marked unused while a link is still plugged in), and text_features says when only its CLIP("")
//   pooled vector is read (pooled from the empty prompt, no T5 tokens).
// * Padding Check and Rewrite Instruction show the text they return (the frontend shows no
//   `ui.text` of its own).
//
// The ratio maths is a faithful copy of gie_core/imaging/ratio.py (nearest ratio in log-aspect space, ties
// to the earlier entry, smallest k with (rw*k, rh*k) covering the image, same placement offsets);
// tests/test_comfy_server.py checks it against the Python in a real browser.
import { app } from "../../scripts/app.js";

// --- constants: copies of gie_core/constants.py (checked by the browser test) -----------------

export const DEFAULT_RATIOS = [[1, 1], [3, 2], [2, 3]];
export const PREFERRED_KONTEXT_RESOLUTIONS = [
  [672, 1568], [688, 1504], [720, 1456], [752, 1392], [800, 1328], [832, 1248],
  [880, 1184], [944, 1104], [1024, 1024], [1104, 944], [1184, 880], [1248, 832],
  [1328, 800], [1392, 752], [1456, 720], [1504, 688], [1568, 672],
];

// --- ratio maths: gie_core/imaging/ratio.py -----------------------------------------------------------

const gcd = (a, b) => { while (b) [a, b] = [b, a % b]; return a; };
const reduce = ([w, h]) => { const g = gcd(w, h); return [w / g, h / g]; };
const dedupe = (pairs) => {
  const seen = new Set();
  return pairs.filter(([w, h]) => !seen.has(`${w}:${h}`) && seen.add(`${w}:${h}`));
};

export const RATIO_SETS = {
  default: dedupe(DEFAULT_RATIOS.map(reduce)),
  kontext: dedupe(PREFERRED_KONTEXT_RESOLUTIONS.map(reduce)),
};

/** parse_ratios: a set name, or "1:1, 16:9" / "1024x768" tokens; throws with Python's message. */
export function parseRatios(spec) {
  const key = spec.trim().toLowerCase();
  if (Object.hasOwn(RATIO_SETS, key)) return RATIO_SETS[key];
  const tokens = spec.split(/[,;]/).filter((t) => t.trim());
  if (!tokens.length) throw new Error(`ratios '${spec}' is empty`);
  return dedupe(tokens.map((tok) => {
    const m = /^\s*(\d+)\s*[:xX]\s*(\d+)\s*$/.exec(tok);
    if (!m || +m[1] <= 0 || +m[2] <= 0) throw new Error(`ratio '${tok.trim()}' must be two positive integers like '3:2'`);
    return reduce([+m[1], +m[2]]);
  }));
}

/** nearest_ratio: compares max(a,b)/min(a,b) with a = W*rh, b = H*rw exactly (BigInt cross products). */
export function nearestRatio(width, height, ratios) {
  let best = null, bestNum = 0n, bestDen = 1n;
  for (const [rw, rh] of ratios) {
    const a = BigInt(width) * BigInt(rh), b = BigInt(height) * BigInt(rw);
    const num = a > b ? a : b, den = a > b ? b : a;
    if (best === null || num * bestDen < bestNum * den) [best, bestNum, bestDen] = [[rw, rh], num, den];
  }
  return best;
}

/** pad_to_ratio's PadRecord, without touching pixels. */
export function padRecord(width, height, ratios, placement = "center") {
  const [rw, rh] = nearestRatio(width, height, ratios);
  const k = Math.max(Math.ceil(width / rw), Math.ceil(height / rh));
  const pw = rw * k, ph = rh * k, dx = pw - width, dy = ph - height;
  // centred axes put the odd leftover pixel right/bottom (ratio._offsets)
  let left = Math.floor(dx / 2), top = Math.floor(dy / 2);
  if (placement === "top") top = 0;
  else if (placement === "bottom") top = dy;
  else if (placement === "left") left = 0;
  else if (placement === "right") left = dx;
  return { ratio: [rw, rh], width: pw, height: ph, left, top, right: dx - left, bottom: dy - top };
}

/** The two preview lines, e.g. ["snaps to 3:2 -> 1536x1024", "from 1536x1000: +pad top 12, bottom 12 px"]. */
export function describeSnap(width, height, ratioSpec, placement) {
  const r = padRecord(width, height, parseRatios(ratioSpec), placement);
  const sides = ["left", "right", "top", "bottom"].filter((s) => r[s]).map((s) => `${s} ${r[s]}`);
  return [
    `snaps to ${r.ratio[0]}:${r.ratio[1]} -> ${r.width}x${r.height}`,
    `from ${width}x${height}: ` + (sides.length ? `+pad ${sides.join(", ")} px` : "already at the ratio, no padding"),
  ];
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

/** The preview text; cheap, so it is recomputed on every draw (images load asynchronously). */
function snapText(node) {
  const size = upstreamImageSize(node);
  let text;
  if (!size) {
    text = "snap preview: connect a Load Image\n(the sizes show once its image loads)";
  } else {
    const custom = String(widgetValue(node, "custom_ratios") ?? "").trim();
    try {
      text = describeSnap(size[0], size[1], custom || String(widgetValue(node, "ratios") ?? "default"),
                          widgetValue(node, "placement") ?? "center").join("\n");
    } catch (e) {
      text = `custom_ratios: ${e.message}`;
    }
  }
  node.gieSnapText = text; // read by the browser test
  return text;
}

// --- Padding Check / Rewrite Instruction: show the text the node returned ------------------------

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

// What each mode reads, as gie_core.engine.connector.fuse does; no mode is named in the logic below.
// BEGIN FUSION_MODE_TABLE (copy of gie_core.engine.modes.table_for_web(); tests/test_web_modes.py keeps them equal)
export const FUSION_MODE_TABLE = {
  "vlm": {"needs_qwen": true, "needs_t5": false, "pooled_from": "empty", "queries": false, "type_embedding": false, "trainable": true},
  "t5": {"needs_qwen": false, "needs_t5": true, "pooled_from": "instruction", "queries": false, "type_embedding": false, "trainable": false},
  "vlm+t5": {"needs_qwen": true, "needs_t5": true, "pooled_from": "instruction", "queries": false, "type_embedding": false, "trainable": true},
  "vlm+t5+type": {"needs_qwen": true, "needs_t5": true, "pooled_from": "instruction", "queries": false, "type_embedding": true, "trainable": true},
  "metaquery": {"needs_qwen": true, "needs_t5": false, "pooled_from": "empty", "queries": true, "type_embedding": false, "trainable": true}
};
// END FUSION_MODE_TABLE

/**
 * How a Fusion Connector in `mode` shows its feature inputs: whether qwen_features is read
 * (needs_qwen) and the label of text_features (only CLIP("") pooled is read when the mode
 * pools from the empty prompt and has no T5 tokens). An unknown mode shows everything, unlabelled.
 */
export function fusionInputLook(mode, table = FUSION_MODE_TABLE) {
  const row = Object.hasOwn(table, mode) ? table[mode] : null;
  if (!row) return { usesQwen: true, textLabel: null };
  const clipEmptyOnly = row.pooled_from === "empty" && !row.needs_t5;
  return { usesQwen: row.needs_qwen, textLabel: clipEmptyOnly ? `${TEXT} (CLIP '' only)` : null };
}

const UNUSED_COLOR = "#555";

/** Label and colour of a slot; null removes them, so nothing stale is saved with the workflow. */
function setLook(slot, label, color) {
  if (label) slot.label = label; else delete slot.label;
  if (color) slot.color_on = slot.color_off = color; else { delete slot.color_on; delete slot.color_off; }
}

function applyFusionMode(node) {
  const mode = widgetValue(node, "mode");
  const { usesQwen, textLabel } = fusionInputLook(mode);
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
    if (node.comfyClass === "GIEPaddingCheck" || node.comfyClass === "GIERewriteInstruction") showExecutedText(node);
  },
  // a loaded workflow restores its saved size and widget values (without callbacks): fit and re-apply
  loadedGraphNode(node) {
    if (node.widgets?.some((w) => w.type === "gie_info")) fitHeight(node);
    if (node.comfyClass === "GIEFusionConnector") applyFusionMode(node);
  },
});
