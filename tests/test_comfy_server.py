"""The pack inside the real ComfyUI server, over HTTP and in a real browser.

Needs a ComfyUI source tree: ``COMFYUI_DIR=/path/to/ComfyUI``; skipped, with that reason, when
it is unset. The server runs with ``COMFYUI_PYTHON`` (default ``$COMFYUI_DIR/../comfy-venv/bin/python``
when it exists, else this interpreter) on the CPU, in a throwaway base directory where the pack is
linked into ``custom_nodes/`` and the tiny models sit in ``models/`` as a user would place them.
The browser tests also need Debian's ``chromium`` and Playwright for Python (never ``playwright
install``); they skip with a reason when either is missing. Screenshots are saved under the
session's temporary directory and, when ``GIE_SCREENSHOT_DIR`` is set, copied there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not COMFYUI_DIR:
    pytest.skip(
        "COMFYUI_DIR is not set: the real-server tests need a ComfyUI source tree "
        "(COMFYUI_DIR=/path/to/ComfyUI, and COMFYUI_PYTHON for its venv's python)",
        allow_module_level=True,
    )
if not (Path(COMFYUI_DIR) / "main.py").is_file():
    pytest.skip(f"COMFYUI_DIR={COMFYUI_DIR} has no main.py: not a ComfyUI source tree", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import bfl_layout  # noqa: E402
from workflow_check import computed_size_height, node_specs, overlaps  # noqa: E402
from gie_core.cli import comfy_run  # noqa: E402
from nodes.loaders import COMFY_TOKENIZERS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UI_DIR = REPO / "workflows"
API_DIR = UI_DIR / "api"
WORKFLOWS = sorted(p.stem for p in API_DIR.glob("*.json"))
PACK = "gpt_image_edit"  # the folder name under custom_nodes/ (also the /extensions/<name>/ prefix)

# The tiny models, under names other than the shipped workflows' so every run proves the
# dropdown lists them and the rewrite reaches them. The Kontext folder is nested one level, as
# people keep models/diffusers/<org>/<name>.
TINY_GIE = "tiny-gpt-image-edit"
TINY_KONTEXT = "tiny/FLUX.1-Kontext-dev"
TINY_FILES = {
    "diffusion_models": "tiny-flux1-kontext-dev.safetensors",
    "vae": "tiny-ae.safetensors",
    "clip": "tiny-clip_l.safetensors",
    "t5": "tiny-t5xxl.safetensors",
}
# gie-convert's files of the tiny checkpoint (name stem "tiny-gie"), as a user converting the release would have
TINY_SPLIT = {
    "transformer": "tiny-gie-kontext-bf16.safetensors",
    "qwen": "tiny-gie-qwen2.5-vl-bf16.safetensors",
    "connector": "tiny-gie-connector.safetensors",
}
# A released-layout checkpoint whose transformer has FLUX's real widths (hidden 3072, 24 heads, context 4096,
# pooled 768) with 1 double + 1 single block: what ComfyUI's FLUX detection needs (it hard-codes the widths).
# Its connector outputs 4096 and its T5/CLIP single files have the real widths (4096, 768), tiny otherwise.
WIDE_GIE = "wide-gie"
WIDE_FILES = {
    "transformer": "wide-gie-kontext-bf16.safetensors",
    "qwen": "wide-gie-qwen2.5-vl-bf16.safetensors",
    "connector": "wide-gie-connector.safetensors",
    "clip": "wide-clip_l.safetensors",
    "t5": "wide-t5xxl.safetensors",
    "vae": "wide-ae.safetensors",  # the real FLUX VAE architecture (random): ComfyUI's VAE loader hard-codes its widths
}
# The tiny Qwen2.5-VL with Qwen2.5's real vocabulary size and special-token ids, so ComfyUI's bundled
# Qwen2.5 tokenizer (comfy/text_encoders/qwen25_tokenizer, the loader's default) can drive it.
REAL_VOCAB_QWEN = "tiny-qwen2.5-vl-real-vocab.safetensors"
REAL_QWEN_VOCAB_SIZE = 152064  # Qwen2.5-VL-7B's embedding rows
INPUT_SIZE = (80, 48)  # 5:3: snaps to 3:2 -> 81x54, so Pad To Ratio pads both axes
OUT_W, OUT_H = 64, 48  # the sampler's output size in the runs (multiples of 16)
STEPS = 2
# What a CPU run of the shipped workflows changes: model names, steps, output size, token budget.
MODEL_INPUTS = {
    "GIECheckpointLoader": {"checkpoint": TINY_GIE},
    "GIEKontextDiffusersLoader": {"kontext": TINY_KONTEXT},
    "GIEKontextModelLoader": {"model_name": TINY_FILES["diffusion_models"]},
    "GIEVAELoader": {"vae_name": TINY_FILES["vae"]},
    "GIETextEncodersLoader": {"clip_name": TINY_FILES["clip"], "t5_name": TINY_FILES["t5"], "tokenizers": TINY_KONTEXT},
    "GIEQwenVLLoader": {"qwen_name": TINY_SPLIT["qwen"], "tokenizer": TINY_GIE},
    "GIEConnectorLoader": {"connector_name": TINY_SPLIT["connector"]},
}
# Per workflow: the native-sampler one runs on the real-width set (native Load Diffusion Model needs it)
WORKFLOW_INPUTS = {
    "released_model_native_sampler": {
        "UNETLoader": {"unet_name": WIDE_FILES["transformer"]},
        "VAELoader": {"vae_name": WIDE_FILES["vae"]},
        "GIETextEncodersLoader": {"clip_name": WIDE_FILES["clip"], "t5_name": WIDE_FILES["t5"], "tokenizers": TINY_KONTEXT,
                                  "dtype": "fp32"},
        "GIEQwenVLLoader": {"qwen_name": WIDE_FILES["qwen"], "tokenizer": TINY_GIE, "dtype": "fp32"},
        "GIEConnectorLoader": {"connector_name": WIDE_FILES["connector"], "dtype": "fp32"},
        "KSampler": {"steps": STEPS},
        "ModelSamplingFlux": {"width": OUT_W, "height": OUT_H},
        "EmptySD3LatentImage": {"width": OUT_W, "height": OUT_H},
    },
    "released_model_from_single_files": {"GIEKontextModelLoader": {"model_name": TINY_SPLIT["transformer"]}},
    # our sampler on the native-sampler workflow's weights (the real-width set), everything fp32
    "ours_on_wide": {
        "GIEKontextModelLoader": {"model_name": WIDE_FILES["transformer"], "dtype": "fp32"},
        "GIEVAELoader": {"vae_name": WIDE_FILES["vae"], "dtype": "fp32"},
        "GIETextEncodersLoader": {"clip_name": WIDE_FILES["clip"], "t5_name": WIDE_FILES["t5"], "tokenizers": TINY_KONTEXT,
                                  "dtype": "fp32"},
        "GIEQwenVLLoader": {"qwen_name": WIDE_FILES["qwen"], "tokenizer": TINY_GIE, "dtype": "fp32"},
        "GIEConnectorLoader": {"connector_name": WIDE_FILES["connector"], "dtype": "fp32"},
        "GIEKontextSampler": {"reference_resize": "keep"},
    },
    # the Qwen loader's default tokenizer, ComfyUI's bundled one, on a Qwen with the real vocabulary
    "bundled_tokenizer": {"GIEKontextModelLoader": {"model_name": TINY_SPLIT["transformer"]},
                          "GIEQwenVLLoader": {"qwen_name": REAL_VOCAB_QWEN, "tokenizer": COMFY_TOKENIZERS}},
    # our VAE loader and ComfyUI's on the same file (one ComfyUI's loader accepts)
    "native_vae_check": {"GIEKontextModelLoader": {"model_name": TINY_SPLIT["transformer"]},
                         "GIEVAELoader": {"vae_name": WIDE_FILES["vae"], "dtype": "fp32"}},
}
SMALL_INPUTS = {
    "GIEKontextSampler": {"steps": STEPS, "width": OUT_W, "height": OUT_H},
    "GIERewriteInstruction": {"max_new_tokens": 16},
    "GIEConversationTurn": {"reference_resize": "keep", "max_new_tokens": 16},
    "GIEAnswer": {"max_new_tokens": 16},
}
LOG_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


def comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = Path(COMFYUI_DIR).resolve().parent / "comfy-venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def place_models(tiny_set, models: Path) -> None:
    """The tiny set where a user puts the real files: checkpoint and diffusers folders, single files."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import load_file

    for kind in ("diffusion_models", "vae", "text_encoders"):
        (models / kind).mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_set.gie_dir, models / "gpt_image_edit" / TINY_GIE)
    shutil.copytree(tiny_set.kontext_dir, models / "diffusers" / TINY_KONTEXT)
    k = tiny_set.kontext_dir
    sd = FluxTransformer2DModel.from_pretrained(k / "transformer").state_dict()
    bfl_layout.save(bfl_layout.flux_diffusers_to_bfl(sd), models / "diffusion_models" / TINY_FILES["diffusion_models"])
    vae = AutoencoderKL.from_pretrained(k / "vae").state_dict()
    bfl_layout.save(bfl_layout.vae_diffusers_to_ldm(vae), models / "vae" / TINY_FILES["vae"])
    clip = load_file(next((k / "text_encoder").glob("*.safetensors")))
    clip = {(n if n.startswith("text_model.") else "text_model." + n): v for n, v in clip.items()}
    bfl_layout.save(clip, models / "text_encoders" / TINY_FILES["clip"])
    bfl_layout.save(load_file(next((k / "text_encoder_2").glob("*.safetensors"))), models / "text_encoders" / TINY_FILES["t5"])
    from gie_core.weights.convert import convert

    convert(tiny_set.gie_dir, models, name="tiny-gie")  # gie-convert's three files, in their folders
    (models / "gie_connectors").mkdir(exist_ok=True)
    wide = build_wide_set(tiny_set, models)
    convert(wide, models, name=WIDE_GIE)
    build_real_vocab_qwen(models / "text_encoders" / TINY_SPLIT["qwen"], models / "text_encoders" / REAL_VOCAB_QWEN)


def build_real_vocab_qwen(tiny_file: Path, out: Path) -> None:
    """gie-convert's tiny Qwen file with its embedding (and LM head) grown to Qwen2.5's vocabulary and
    its config's special-token ids set to those of ComfyUI's bundled tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from gie_core.weights.reader import CheckpointReader, save_safetensors_atomic

    tok = AutoTokenizer.from_pretrained(Path(COMFYUI_DIR) / "comfy" / "text_encoders" / "qwen25_tokenizer",
                                        local_files_only=True)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("bos_token_id", "<|endoftext|>"), ("pad_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("vision_token_id", "<|vision_pad|>"), ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    assert ids["image_token_id"] == 151655, ids  # the real Qwen2.5 ids
    g = torch.Generator().manual_seed(0)
    with CheckpointReader.open(tiny_file) as r:
        meta = dict(r.metadata)
        cfg = json.loads(meta["gie_qwen_config"])
        state = {}
        for key in r.keys():
            t = r.read(key)
            if key.endswith(("embed_tokens.weight", "lm_head.weight")) and t.shape[0] == cfg["vocab_size"]:
                t = torch.randn(REAL_QWEN_VOCAB_SIZE, t.shape[1], generator=g).to(t.dtype) * 0.02
            state[key] = t
    cfg.update(ids, vocab_size=REAL_QWEN_VOCAB_SIZE)
    meta["gie_qwen_config"] = json.dumps(cfg)
    save_safetensors_atomic(state, out, metadata=meta)


def bypass_kontext_scale(prompt: dict) -> None:
    """Feed FluxKontextImageScale's consumers its input instead: on the CPU, a real-width transformer over a
    ~1 MP reference's 4000 tokens takes minutes a step; the small input keeps it to seconds."""
    for nid, node in prompt.items():
        for k, v in node["inputs"].items():
            if isinstance(v, list) and prompt[v[0]]["class_type"] == "FluxKontextImageScale":
                node["inputs"][k] = prompt[v[0]]["inputs"]["image"]


def build_wide_set(tiny_set, root: Path) -> Path:
    """A released-layout checkpoint with a real-width FLUX transformer (1 double + 1 single block, random),
    the tiny Qwen2.5-VL, a connector to 4096, and T5 / CLIP-L single files of the real widths (one layer)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from gie_core.weights.reader import CheckpointReader, save_safetensors_atomic

    torch.manual_seed(0)
    gie = root / "gpt_image_edit" / WIDE_GIE
    gie.mkdir(parents=True)
    cfg = json.loads((tiny_set.gie_dir / "config.json").read_text())
    denoiser = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    state = {"denoise_tower.denoiser." + k: v for k, v in denoiser.state_dict().items()}
    cfg["denoise_tower"]["denoiser_config"] = json.loads(denoiser.to_json_string())
    del denoiser
    qwen_width = cfg["hidden_size"]
    cfg["denoise_tower"]["output_hidden_size"] = 4096
    state["denoise_tower.denoise_projector.0.weight"] = torch.randn(64, qwen_width) * 0.02
    state["denoise_tower.denoise_projector.0.bias"] = torch.zeros(64)
    state["denoise_tower.denoise_projector.2.weight"] = torch.randn(4096, 64) * 0.02
    state["denoise_tower.denoise_projector.2.bias"] = torch.zeros(4096)
    with CheckpointReader.open(tiny_set.gie_dir) as r:
        state.update({k: r.read(k) for k in r.keys() if not k.startswith("denoise_tower.")})
    save_safetensors_atomic(state, gie / "model.safetensors")
    del state
    (gie / "config.json").write_text(json.dumps(cfg))
    for f in tiny_set.gie_dir.iterdir():  # tokenizer, chat template, preprocessor
        if f.suffix in (".json", ".txt", ".jinja", ".model") and f.name not in ("config.json",) and "index" not in f.name:
            shutil.copy(f, gie / f.name)
    from transformers import AutoTokenizer

    tok = tiny_set.kontext_dir
    clip_tok = AutoTokenizer.from_pretrained(tok / "tokenizer", local_files_only=True)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=768, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                        projection_dim=768, bos_token_id=clip_tok.bos_token_id,
                                        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    clip_sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip.state_dict().items()}
    bfl_layout.save(clip_sd, root / "text_encoders" / WIDE_FILES["clip"])

    t5_vocab = len(AutoTokenizer.from_pretrained(tok / "tokenizer_2", local_files_only=True))
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=4096, d_kv=64, num_heads=64, d_ff=16, num_layers=1,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                 is_encoder_decoder=False, use_cache=False))
    bfl_layout.save(t5.state_dict(), root / "text_encoders" / WIDE_FILES["t5"])
    from diffusers import AutoencoderKL

    from gie_core.weights.single_file import VAE_CONFIG, load_config, model_kwargs

    vae = AutoencoderKL(**model_kwargs(load_config(VAE_CONFIG)))
    bfl_layout.save(bfl_layout.vae_diffusers_to_ldm(vae.state_dict()), root / "vae" / WIDE_FILES["vae"])
    return gie


def write_input_images(input_dir: Path) -> None:
    """example.png (the name every shipped workflow loads), a portrait one, and one to upload."""
    rng = np.random.default_rng(0)
    w, h = INPUT_SIZE
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(input_dir / "example.png")
    Image.fromarray(rng.integers(0, 255, (w, h, 3), dtype=np.uint8)).save(input_dir / "portrait.png")
    Image.fromarray(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(input_dir.parent / "upload_me.png")


class ComfyServer:
    """A ComfyUI server process on a free port with its own base directory."""

    def __init__(self, base: Path):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        cmd = [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.base)]
        env = {**os.environ, **LOG_ENV}
        env.pop("COMFYUI_SERVER", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        pytest.fail(f"ComfyUI did not answer /system_stats within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server and nothing else
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            body = r.read()
        return json.loads(body) if body else None

    def get_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def post(self, path: str, payload) -> None:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=60).read()

    def wait_history(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:
                return entry
            time.sleep(0.25)
        pytest.fail(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_set):
    base = tmp_path_factory.mktemp("comfyui_base")
    for d in ("custom_nodes", "input", "output", "user"):
        (base / d).mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    place_models(tiny_set, base / "models")
    write_input_images(base / "input")
    srv = ComfyServer(base)
    print(f"\nComfyUI {COMFYUI_DIR} with {comfy_python()} at {srv.url}, base {base}")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="session")
def pack_nodes():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_pack_loads_without_import_error_and_every_node_is_listed(server, object_info, pack_nodes):
    classes, names = pack_nodes
    log = server.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line]
    assert not [line for line in failed if PACK in line], f"the pack failed to import:\n{server.log_tail(80)}"
    assert f"custom_nodes/{PACK}" in log  # listed under "Import times for custom nodes"
    missing = sorted(set(classes) - set(object_info))
    assert not missing, f"nodes missing from /object_info: {missing}"
    for name in classes:
        info = object_info[name]
        assert info["python_module"] == f"custom_nodes.{PACK}", name
        assert info["display_name"] == names[name]
        assert info["description"], f"{name} has no description"


def test_extension_and_help_pages_are_served(server, pack_nodes):
    """The frontend loads every listed .js; it fetches help from /extensions/<pack>/docs/<Node>.md."""
    assert f"/extensions/{PACK}/gie.js" in server.get("/extensions")
    for name in pack_nodes[0]:
        assert server.get_status(f"/extensions/{PACK}/docs/{name}.md") == 200, f"no help page for {name}"


def test_pack_routes_answer_from_gie_core(server):
    """GET /api/gie/rules and /api/gie/pad_plan (where the extension's api.fetchApi asks) answer with gie_core."""
    from gie_core.engine import web_rules
    from gie_core.imaging.ratio import plan_padding

    assert server.get("/api/gie/rules") == json.loads(json.dumps(web_rules.rules()))
    assert server.get("/api/gie/pad_plan?width=80&height=48&ratios=kontext&custom_ratios=&placement=top") == \
        plan_padding(80, 48, "kontext", "top").to_dict()
    assert server.get_status("/api/gie/pad_plan?width=80&height=48&custom_ratios=1:1,x") == 400


def test_workflows_appear_in_the_template_browser(server):
    """The template browser lists the pack's UI workflows (not the API twins) and serves them."""
    listed = server.get("/workflow_templates")
    assert sorted(listed.get(PACK, [])) == sorted(WORKFLOWS)
    for name in WORKFLOWS:
        served = server.get(f"/api/workflow_templates/{PACK}/{name}.json")
        assert served == json.loads((UI_DIR / f"{name}.json").read_text()), name


def test_tiny_models_appear_in_the_loader_dropdowns(object_info):
    for cls, inputs in MODEL_INPUTS.items():
        required = object_info[cls]["input"]["required"]
        for name, value in inputs.items():
            choices = required[name][0]
            assert value in choices, f"{cls}.{name}: {value!r} not among {choices}"


# ---------------------------------------------------------------------------------------------
# Running the API workflows over HTTP (through gie-comfy-run's own --set machinery)
# ---------------------------------------------------------------------------------------------


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def padded_ratio(prompt: dict, node_id: str, input_size: tuple[int, int]) -> tuple[int, int] | None:
    """The ratio a sampler's reference was padded to, when a Pad To Ratio feeds it."""
    node = prompt[node_id]
    if node["class_type"] == "GIEPadToRatio":
        from gie_core.imaging.ratio import nearest_ratio

        w, h = expected_size(prompt, node["inputs"]["image"][0], input_size)
        return nearest_ratio(w, h, node["inputs"].get("custom_ratios") or node["inputs"]["ratios"])
    src = node["inputs"].get("image")
    return padded_ratio(prompt, src[0], input_size) if isinstance(src, list) else None


def sampler_size(prompt: dict, node_id: str, input_size: tuple[int, int]) -> tuple[int, int]:
    """A small output size; a padded reference's exact ratio, so Crop Padding accepts the result."""
    ratio = padded_ratio(prompt, node_id, input_size)
    return (OUT_W, OUT_H) if ratio is None else (16 * ratio[0], 16 * ratio[1])


def small_run_values(prompt: dict, input_size: tuple[int, int], workflow: str | None = None) -> dict[str, dict]:
    """Per node, the inputs that point a shipped workflow at the tiny models with a small, quick run."""
    out = {}
    extra = WORKFLOW_INPUTS.get(workflow, {})
    for node_id, node in prompt.items():
        cls = node["class_type"]
        values = {**MODEL_INPUTS.get(cls, {}), **SMALL_INPUTS.get(cls, {}), **extra.get(cls, {})}
        if cls == "GIEKontextSampler":
            values["width"], values["height"] = sampler_size(prompt, node_id, input_size)
        values = {k: v for k, v in values.items() if k in node["inputs"]}
        if values:
            out[node_id] = values
    return out


def small_run_sets(prompt: dict, input_size: tuple[int, int] = INPUT_SIZE, workflow: str | None = None) -> list[str]:
    """The same as gie-comfy-run --set arguments."""
    values = small_run_values(prompt, input_size, workflow)
    return [f"{i}.{k}={json.dumps(v)}" for i, vals in values.items() for k, v in vals.items()]


def expected_size(prompt: dict, node_id: str, input_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the IMAGE a node outputs in a small run."""
    node = prompt[node_id]
    cls, inputs = node["class_type"], node["inputs"]
    if cls == "LoadImage":
        return input_size
    if cls == "VAEDecode":  # KSampler's latent: EmptySD3LatentImage's size
        ks = prompt[inputs["samples"][0]]
        empty = prompt[ks["inputs"]["latent_image"][0]]["inputs"]
        return (empty["width"], empty["height"])
    if cls == "GIEKontextSampler":
        return sampler_size(prompt, node_id, input_size)
    if cls == "GIECropPadding":  # back to the padded image's original size
        pad = prompt[inputs["pad_record"][0]]
        return expected_size(prompt, pad["inputs"]["image"][0], input_size)
    if cls == "GIEPadToRatio":
        from gie_core.imaging.ratio import pad_to_ratio

        w, h = expected_size(prompt, inputs["image"][0], input_size)
        _, record = pad_to_ratio(np.zeros((h, w, 3), np.uint8), inputs.get("custom_ratios") or inputs["ratios"])
        return (record.padded_width, record.padded_height)
    if "images" in inputs:
        return expected_size(prompt, inputs["images"][0], input_size)
    raise AssertionError(f"no size rule for {cls}")


def check_outputs(prompt: dict, saved: list[Path], input_size: tuple[int, int]) -> None:
    """Every SaveImage wrote batch_size images of the expected size (files named by its prefix)."""
    saves = {i: n for i, n in prompt.items() if n["class_type"] == "SaveImage"}
    assert saves, "the workflow saves nothing"
    for node_id, node in saves.items():
        prefix = node["inputs"]["filename_prefix"].split("/")[-1] + "_"
        files = [p for p in saved if re.fullmatch(re.escape(prefix) + r"\d{5}_(-\d+)?\.png", p.name)]
        src = prompt[node["inputs"]["images"][0]]
        batch = src["inputs"].get("batch_size", 1) if src["class_type"] == "GIEKontextSampler" else 1
        assert len(files) == batch, f"SaveImage {node_id} ({prefix}*): {[p.name for p in saved]}"
        want = expected_size(prompt, node_id, input_size)
        for f in files:
            with Image.open(f) as im:
                assert im.size == want, f"{f.name} is {im.size}, expected {want}"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflow_runs_to_success_over_http(server, name, tmp_path, capsys):
    prompt = load_api(name)
    wf = tmp_path / f"{name}.json"
    wf.write_text(json.dumps(prompt))
    out = tmp_path / "out"
    upload = server.base / "upload_me.png"
    with Image.open(upload) as im:
        size = im.size
    if name == "released_model_native_sampler":
        bypass_kontext_scale(prompt)
        wf.write_text(json.dumps(prompt))
    args = [str(wf), "--server", server.url, "--quiet", "-o", str(out), "--timeout", "600", "--image", str(upload)]
    sets = small_run_sets(prompt, size, name)
    for s in sets:
        args += ["--set", s]
    code = comfy_run.main(args)
    captured = capsys.readouterr()
    assert code == 0, f"{captured.err}\n--- server log ---\n{server.log_tail()}"
    saved = [Path(line) for line in captured.out.splitlines() if line.strip()]
    assert saved and all(p.is_file() for p in saved)
    for s in sets:  # what ran
        comfy_run.apply_set(prompt, s)
    check_outputs(prompt, saved, size)


def test_connector_conditioning_flows_through_native_flux_guidance(server, tmp_path, capsys):
    """Our Fusion Connector's CONDITIONING is native: ComfyUI's own FluxGuidance accepts it, and
    the guidance it sets reaches our sampler (two values, two different images)."""
    base = load_api("released_model_edit")
    sampler_id = next(i for i, n in base.items() if n["class_type"] == "GIEKontextSampler")
    upload = server.base / "upload_me.png"
    with Image.open(upload) as im:
        size = im.size
    pixels = {}
    for guidance in (1.5, 6.0):
        prompt = json.loads(json.dumps(base))
        positive = prompt[sampler_id]["inputs"]["positive"]
        prompt["900"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": positive, "guidance": guidance},
                         "_meta": {"title": "Native FluxGuidance"}}
        prompt[sampler_id]["inputs"]["positive"] = ["900", 0]
        wf = tmp_path / f"guided_{guidance}.json"
        wf.write_text(json.dumps(prompt))
        out = tmp_path / f"out_{guidance}"
        args = [str(wf), "--server", server.url, "--quiet", "-o", str(out), "--timeout", "600", "--image", str(upload)]
        for s in small_run_sets(prompt, size):
            args += ["--set", s]
        code = comfy_run.main(args)
        captured = capsys.readouterr()
        assert code == 0, f"{captured.err}\n--- server log ---\n{server.log_tail()}"
        saved = [Path(line) for line in captured.out.splitlines() if line.strip()]
        check_outputs(prompt, saved, size)
        with Image.open(saved[0]) as im:
            pixels[guidance] = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(pixels[1.5] - pixels[6.0]).max() > 0


# ---------------------------------------------------------------------------------------------
# ComfyUI's own model system: converted files, native loaders and samplers, native objects
# ---------------------------------------------------------------------------------------------

NATIVE_FORWARD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[4])
from comfy.cli_args import args
args.cpu = True  # as the server's --cpu
import comfy.sd
model = comfy.sd.load_diffusion_model(sys.argv[1], model_options={"dtype": torch.float32})
dm = model.model.diffusion_model
inp = torch.load(sys.argv[2])
with torch.no_grad():
    out = dm(inp["x"], inp["t"], inp["context"], y=inp["y"], guidance=inp["guidance"])
torch.save(out.float(), sys.argv[3])
print(json.dumps({"model": type(model.model).__name__, "hidden": dm.hidden_size, "double": len(dm.double_blocks),
                  "single": len(dm.single_blocks), "context": dm.txt_in.in_features, "vec": dm.vector_in.in_layer.in_features}))
"""


def test_converted_transformer_is_flux_to_native_load_diffusion_model_and_matches_ours(server, tmp_path):
    """gie-convert's transformer (real width, 1 + 1 blocks, from the released layout) is detected as FLUX
    by ComfyUI's own loader, and one forward of ComfyUI's Flux model equals our diffusers transformer."""
    import torch

    from gie_core.engine.sampler import latent_ids, pack_latents, unpack_latents
    from gie_core.weights.single_file import load_bfl_transformer

    path = server.base / "models" / "diffusion_models" / WIDE_FILES["transformer"]
    g = torch.Generator().manual_seed(0)
    inp = {"x": torch.randn(1, 16, 8, 12, generator=g), "t": torch.tensor([0.7]), "context": torch.randn(1, 20, 4096, generator=g),
           "y": torch.randn(1, 768, generator=g), "guidance": torch.tensor([3.5])}
    torch.save(inp, tmp_path / "in.pt")
    res = subprocess.run([comfy_python(), "-c", NATIVE_FORWARD, str(path), str(tmp_path / "in.pt"), str(tmp_path / "out.pt"),
                          COMFYUI_DIR], capture_output=True, text=True, timeout=600, cwd=COMFYUI_DIR)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"model": "Flux", "hidden": 3072, "double": 1, "single": 1, "context": 4096, "vec": 768}
    native = torch.load(tmp_path / "out.pt")
    ours_model = load_bfl_transformer(path, dtype=torch.float32)
    with torch.no_grad():
        out = ours_model(hidden_states=pack_latents(inp["x"]), timestep=inp["t"], guidance=inp["guidance"],
                         pooled_projections=inp["y"], encoder_hidden_states=inp["context"],
                         txt_ids=torch.zeros(20, 3), img_ids=latent_ids(4, 6), return_dict=False)[0]
    ours = unpack_latents(out, 8, 12)
    rel = ((ours - native).abs().max() / native.abs().max()).item()
    assert rel <= 1e-4, rel


def run_api(server, prompt: dict, name: str, tmp_path: Path, capsys, workflow: str | None = None) -> list[Path]:
    wf = tmp_path / f"{name}.json"
    wf.write_text(json.dumps(prompt))
    args = [str(wf), "--server", server.url, "--quiet", "-o", str(tmp_path / f"out_{name}"), "--timeout", "600"]
    for s in small_run_sets(prompt, INPUT_SIZE, workflow):
        args += ["--set", s]
    code = comfy_run.main(args)
    captured = capsys.readouterr()
    assert code == 0, f"{captured.err}\n--- server log ---\n{server.log_tail()}"
    return [Path(line) for line in captured.out.splitlines() if line.strip()]


def pixels(path: Path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_native_sampler_uses_reference_latent(server, tmp_path, capsys):
    """The native-sampler workflow on the converted real-width transformer: with ReferenceLatent the
    reference reaches the model (the image changes), as native Flux Kontext uses it."""
    prompt = load_api("released_model_native_sampler")
    bypass_kontext_scale(prompt)
    with_ref = run_api(server, prompt, "with_ref", tmp_path, capsys, "released_model_native_sampler")
    guidance = next(i for i, n in prompt.items() if n["class_type"] == "FluxGuidance")
    ref = prompt[guidance]["inputs"]["conditioning"][0]
    prompt[guidance]["inputs"]["conditioning"] = prompt[ref]["inputs"]["conditioning"]  # skip ReferenceLatent
    without = run_api(server, prompt, "without_ref", tmp_path, capsys, "released_model_native_sampler")
    assert pixels(with_ref[0]).shape == (OUT_H, OUT_W, 3)
    assert np.abs(pixels(with_ref[0]) - pixels(without[0])).max() > 0


NATIVE_PARITY_STEPS = int(os.environ.get("GIE_NATIVE_PARITY_STEPS", "8"))


def test_native_ksampler_matches_our_sampler_on_the_converted_weights(server, tmp_path, capsys):
    """The same edit two ways on the same converted weights: native Load Diffusion Model + ModelSamplingFlux +
    ReferenceLatent + FluxGuidance + KSampler (euler, simple, cfg 1), and our Kontext Sampler. Same noise (a CPU
    generator seeded alike), same reference latents; at 8 steps ComfyUI's 'simple' schedule picks exactly the
    reference's sigmas, so the images agree to the last 8-bit level. (GIE_NATIVE_PARITY_STEPS=28 measures the
    published setting, where 'simple' rounds sigmas to its 1000-entry table; see the README.)"""
    native_prompt = load_api("released_model_native_sampler")
    bypass_kontext_scale(native_prompt)
    ks = next(i for i, n in native_prompt.items() if n["class_type"] == "KSampler")
    native_prompt[ks]["inputs"].update(seed=42, steps=NATIVE_PARITY_STEPS)
    native = run_api(server, native_prompt, "native", tmp_path, capsys, "released_model_native_sampler")
    ours_prompt = load_api("released_model_from_single_files")
    sampler = next(i for i, n in ours_prompt.items() if n["class_type"] == "GIEKontextSampler")
    ours_prompt[sampler]["inputs"].update(seed=42, steps=NATIVE_PARITY_STEPS, guidance=3.5)
    ours = run_api(server, ours_prompt, "ours", tmp_path, capsys, "ours_on_wide")
    a, b = pixels(native[0]), pixels(ours[0])
    assert a.shape == b.shape == (OUT_H, OUT_W, 3)
    diff = np.abs(a - b)
    mse = float((diff.astype(np.float64) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    print(f"native vs ours, {NATIVE_PARITY_STEPS} steps: max |diff| {diff.max()} / 255, PSNR {psnr:.1f} dB")
    if NATIVE_PARITY_STEPS == 8:
        assert diff.max() <= 1


def test_qwen_vl_encode_runs_with_comfyuis_bundled_tokenizer(server, tmp_path, capsys):
    """The path the README recommends: GIE Qwen-VL Loader with its default tokenizer, ComfyUI's bundled
    Qwen2.5 one, whose tokenizer_config.json carries the text-only Qwen2.5 chat template. Qwen-VL Encode
    renders the image + instruction prompt itself, so the shipped workflow runs (it failed with
    'TypeError: can only concatenate str (not "list") to str', issue 17)."""
    prompt = load_api("released_model_from_single_files")
    loader = next(i for i, n in prompt.items() if n["class_type"] == "GIEQwenVLLoader")
    assert prompt[loader]["inputs"]["tokenizer"] == COMFY_TOKENIZERS  # as shipped
    saved = run_api(server, prompt, "bundled_tokenizer", tmp_path, capsys, "bundled_tokenizer")
    for s in small_run_sets(prompt, INPUT_SIZE, "bundled_tokenizer"):
        comfy_run.apply_set(prompt, s)
    check_outputs(prompt, saved, INPUT_SIZE)


def test_two_images_through_native_ksampler(server, tmp_path, capsys):
    """Image 2 on the native path, both ways a user wires it, on the converted real-width transformer: Qwen-VL
    Encode's image_2 plus one native VAEEncode + ReferenceLatent per image; and GIE Conversation Turn (with
    ComfyUI's own VAE), whose CONDITIONING already carries every image as a reference latent. Image 2 reaches
    the model (the image changes without it)."""
    base = load_api("released_model_native_sampler")
    bypass_kontext_scale(base)
    ids = {n["class_type"]: i for i, n in base.items()}
    image_2 = {"class_type": "LoadImage", "inputs": {"image": "portrait.png"}, "_meta": {"title": "Image 2"}}
    per_image = json.loads(json.dumps(base))
    per_image.update({"900": image_2,
                      "901": {"class_type": "VAEEncode", "inputs": {"pixels": ["900", 0], "vae": [ids["VAELoader"], 0]},
                              "_meta": {"title": "VAE Encode (Image 2)"}},
                      "902": {"class_type": "ReferenceLatent", "inputs": {"conditioning": [ids["ReferenceLatent"], 0],
                                                                          "latent": ["901", 0]},
                              "_meta": {"title": "ReferenceLatent (Image 2)"}}})
    per_image[ids["GIEQwenVLEncode"]]["inputs"]["image_2"] = ["900", 0]
    per_image[ids["FluxGuidance"]]["inputs"]["conditioning"] = ["902", 0]
    saved = run_api(server, per_image, "native_per_image", tmp_path, capsys, "released_model_native_sampler")
    assert pixels(saved[0]).shape == (OUT_H, OUT_W, 3)

    turned = {}
    for name, with_2 in (("turn_two", True), ("turn_one", False)):
        prompt = json.loads(json.dumps(base))
        loaders = {c: [ids[c], 0] for c in ("GIEQwenVLLoader", "GIEConnectorLoader", "GIETextEncodersLoader", "VAELoader")}
        turn_inputs = {"qwen_vl": loaders["GIEQwenVLLoader"], "connector": loaders["GIEConnectorLoader"],
                       "text_encoders": loaders["GIETextEncodersLoader"], "vae": loaders["VAELoader"],
                       "instruction": "put the hat from image 2 on the dog in image 1", "mode": "vlm+t5", "route": "edit",
                       "reference_resize": "keep", "image": base[ids["GIEQwenVLEncode"]]["inputs"]["image"]}
        prompt["910"] = {"class_type": "GIEConversationTurn", "inputs": turn_inputs, "_meta": {"title": "Turn"}}
        if with_2:
            prompt["900"] = image_2
            turn_inputs["image_2"] = ["900", 0]
        prompt[ids["FluxGuidance"]]["inputs"]["conditioning"] = ["910", 0]
        turned[name] = run_api(server, prompt, name, tmp_path, capsys, "released_model_native_sampler")[0]
    assert pixels(turned["turn_two"]).shape == (OUT_H, OUT_W, 3)
    assert np.abs(pixels(turned["turn_two"]) - pixels(turned["turn_one"])).max() > 0


def test_native_load_vae_serves_our_sampler(server, tmp_path, capsys):
    """ComfyUI's own Load VAE (ae.safetensors) into our Kontext Sampler gives the image our VAE loader gives."""
    prompt = load_api("released_model_from_single_files")
    ours = run_api(server, prompt, "our_vae", tmp_path, capsys, "native_vae_check")
    sampler = next(i for i, n in prompt.items() if n["class_type"] == "GIEKontextSampler")
    prompt["901"] = {"class_type": "VAELoader", "inputs": {"vae_name": WIDE_FILES["vae"]}, "_meta": {"title": "Load VAE"}}
    prompt[sampler]["inputs"]["vae"] = ["901", 0]
    native = run_api(server, prompt, "native_vae", tmp_path, capsys, "native_vae_check")
    assert np.abs(pixels(ours[0]) - pixels(native[0])).max() <= 2


# ---------------------------------------------------------------------------------------------
# Interrupt
# ---------------------------------------------------------------------------------------------


def test_interrupt_during_sampling_ends_that_prompt_and_the_next_one_runs(server):
    import websocket

    prompt = load_api("released_model_edit")
    for s in small_run_sets(prompt):
        comfy_run.apply_set(prompt, s)
    sampler = next(i for i, n in prompt.items() if n["class_type"] == "GIEKontextSampler")
    long_run = json.loads(json.dumps(prompt))
    # the most steps the sampler allows, at a size where each takes a while: the interrupt lands mid-run
    long_run[sampler]["inputs"].update(steps=200, width=1024, height=1024, seed=1234)

    client = comfy_run.ComfyClient(server.url)
    ws = websocket.create_connection(client.ws_url(), timeout=300)
    try:
        prompt_id = client.queue_prompt(long_run)
        events = []
        progress_at_interrupt = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            msg = ws.recv()
            if not isinstance(msg, str):
                continue
            msg = json.loads(msg)
            data = msg.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            events.append(msg["type"])
            if msg["type"] == "progress" and data.get("node") == sampler:
                progress_at_interrupt = data["value"]
                if data["value"] >= 2 and "interrupt" not in events:
                    assert data["max"] == 200
                    server.post("/interrupt", {"prompt_id": prompt_id})
                    events.append("interrupt")
            if msg["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                break
        assert events[-1] == "execution_interrupted", (events[-10:], server.log_tail())
        status = server.wait_history(prompt_id, 60)["status"]
        assert status["status_str"] == "error" and not status["completed"]
        assert [m[0] for m in status["messages"]][-1] == "execution_interrupted"
    finally:
        ws.close()

    # the next prompt runs to success
    prompt[sampler]["inputs"]["seed"] = 4321
    entry = server.wait_history(client.queue_prompt(prompt), 600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert progress_at_interrupt < 200


# ---------------------------------------------------------------------------------------------
# gie-comfy-run, as a user runs it
# ---------------------------------------------------------------------------------------------


def comfy_run_command() -> list[str]:
    """The installed console script next to the server's python, else the module from this checkout."""
    script = Path(comfy_python()).parent / "gie-comfy-run"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gie_core.cli.comfy_run"]


def run_cli(server, *args, timeout=600):
    return subprocess.run([*comfy_run_command(), *map(str, args), "--server", server.url],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_gie_comfy_run_completes_against_the_server(server, tmp_path):
    prompt = load_api("pad_edit_crop")
    upload = server.base / "upload_me.png"
    with Image.open(upload) as im:
        size = im.size
    sets = [a for s in small_run_sets(prompt, size) for a in ("--set", s)]
    # node refs by title work too; this value would be a string without JSON parsing
    sets += ["--set", "GIE Kontext Sampler.seed=7", "--set", "Instruction.value=make it winter"]
    res = run_cli(server, API_DIR / "pad_edit_crop.json", "--image", f"Load Image={upload}", *sets, "-o", tmp_path / "out")
    assert res.returncode == 0, f"{res.stderr}\n--- server log ---\n{server.log_tail()}"
    assert "queued prompt" in res.stderr and "uploaded" in res.stderr
    assert "Kontext Sampler" in res.stderr and f"{STEPS}/{STEPS}" in res.stderr  # the progress bar
    saved = [Path(p) for p in res.stdout.split()]
    check_outputs(prompt, saved, size)


def test_gie_comfy_run_prints_validation_errors_and_fails(server, tmp_path):
    res = run_cli(server, API_DIR / "released_model_edit.json", "--quiet", "--set", "GIE Kontext Sampler.steps=0",
                  "--set", f"1.checkpoint={json.dumps('no-such-checkpoint')}", "-o", tmp_path)
    assert res.returncode == 1, res.stderr
    assert "the server rejected the workflow" in res.stderr
    assert 'node 1 "GIE Checkpoint Loader (GPT-Image-Edit folder)" (GIECheckpointLoader):' in res.stderr
    assert "no-such-checkpoint" in res.stderr
    assert 'node 8 "GIE Kontext Sampler" (GIEKontextSampler):' in res.stderr and "steps" in res.stderr
    assert not list(tmp_path.glob("*.png"))


def test_gie_comfy_run_prints_the_failing_node_and_exception(server, tmp_path):
    prompt = load_api("released_model_edit")
    sets = [a for s in small_run_sets(prompt) for a in ("--set", s)]
    # the tiny connector, like the released one, has no metaquery parameters: the node raises
    res = run_cli(server, API_DIR / "released_model_edit.json", "--quiet", *sets, "--set", "GIE Fusion Connector.mode=metaquery",
                  "-o", tmp_path)
    assert res.returncode == 1, res.stderr
    assert 'node 7 "GIE Fusion Connector" (GIEFusionConnector) failed:' in res.stderr
    assert "metaquery" in res.stderr


# ---------------------------------------------------------------------------------------------
# The frontend in headless Chromium
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shots(tmp_path_factory):
    """Where screenshots go: a session directory, copied to $GIE_SCREENSHOT_DIR when set."""
    d = tmp_path_factory.mktemp("screenshots")
    yield d
    if os.environ.get("GIE_SCREENSHOT_DIR"):
        dest = Path(os.environ["GIE_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        for p in d.glob("*.png"):
            shutil.copy2(p, dest / p.name)
    print(f"\nscreenshots: {d}")


@pytest.fixture(scope="module")  # as the browser it opens (tests/conftest.py)
def page(browser, server):
    server.post("/settings/Comfy.TutorialCompleted", True)
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    loopback = ("http://127.0.0.1", "ws://127.0.0.1", "http://localhost", "data:", "blob:")
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(loopback) else route.abort())
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(f"{e}\n{e.stack}"))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and PACK in str(m.location) else None)
    pg.goto(server.url, wait_until="domcontentloaded")
    pg.wait_for_function("window.app && window.app.graph && window.app.extensionManager", timeout=120_000)
    pg.wait_for_function("app.extensions.some(e => e.name === 'gpt_image_edit.ui')", timeout=60_000)
    print(f"\nfrontend errors while starting (not ours): {errors}" if errors else "")
    errors.clear()  # from here on, every page error fails the browser tests
    pg.gie_errors = errors
    yield pg
    ctx.close()


def load_ui(page, name: str) -> None:
    ui = json.loads((UI_DIR / f"{name}.json").read_text())
    page.evaluate(
        "async ([ui, name]) => { await app.loadGraphData(ui, true, true, name,"
        " {showMissingNodesDialog: false, showMissingModelsDialog: false}); }",
        [ui, name],
    )
    page.evaluate("() => app.canvas.setDirty(true, true)")
    page.wait_for_timeout(300)


def set_widgets(page, node_id: int, values: dict) -> None:
    """As a user picking values: the widget's value, then its callback."""
    page.evaluate(
        """([id, values]) => {
            const node = app.graph.getNodeById(id);
            for (const [name, value] of Object.entries(values)) {
                const w = node.widgets.find(w => w.name === name);
                if (!w) throw new Error(`node ${id} has no widget ${name}`);
                w.value = value;
                w.callback?.(value, app.canvas, node);
            }
            app.canvas.setDirty(true, true);
        }""",
        [node_id, values],
    )


def focus(page, node_ids=()) -> None:
    """Centre the view on ``node_ids`` (all nodes when empty)."""
    page.evaluate(
        """(ids) => {
            const nodes = ids.length ? ids.map(i => app.graph.getNodeById(i)) : app.graph.nodes;
            const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - 40));
            const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
            const c = app.canvas, W = c.canvas.clientWidth, H = c.canvas.clientHeight;
            const s = Math.min(1.5, 0.9 * Math.min(W / (x1 - x0), H / (y1 - y0)));
            c.ds.scale = s;
            c.ds.offset[0] = W / (2 * s) - (x0 + x1) / 2;
            c.ds.offset[1] = H / (2 * s) - (y0 + y1) / 2;
            c.setDirty(true, true);
        }""",
        list(node_ids),
    )
    page.wait_for_timeout(400)


def screenshot(page, shots: Path, name: str, node_ids=()) -> Path:
    """Centre the view on ``node_ids`` (all nodes when empty) and save a screenshot."""
    focus(page, node_ids)
    path = shots / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def drawn_layout(page) -> dict[int, dict]:
    """Per node: the rectangle the page draws it in (title bar included) and its computeSize() height."""
    rows = page.evaluate(
        "() => app.graph.nodes.map(n => ({id: n.id, type: n.type, rect: [...n.boundingRect], computed: n.computeSize()[1]}))")
    return {r["id"]: r for r in rows}


def check_drawn_layout(page, specs, moment: str) -> None:
    """No node drawn over another, and the frontend's computed heights are the layout model's
    (tests/workflow_check.py, which the default suite checks every shipped workflow with)."""
    layout = drawn_layout(page)
    assert overlaps({i: tuple(r["rect"]) for i, r in layout.items()}) == [], moment
    model = {i: computed_size_height(specs.get(r["type"]), r["type"]) for i, r in layout.items()}
    assert {i: r["computed"] for i, r in layout.items()} == model, moment


@pytest.fixture(scope="session")
def specs(pack_nodes):
    return node_specs(*pack_nodes)


def ui_node_ids(page, cls: str) -> list[int]:
    return page.evaluate("(cls) => app.graph.nodes.filter(n => n.comfyClass === cls).map(n => n.id)", cls)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_loads_matches_its_api_twin_and_queues(page, server, shots, specs, name):
    load_ui(page, name)
    for node_id in ui_node_ids(page, "LoadImage"):  # its preview widget comes with the picture
        page.wait_for_function("(id) => app.graph.getNodeById(id).imgs?.[0]?.naturalWidth > 0", arg=node_id, timeout=30_000)
    check_drawn_layout(page, specs, "as loaded")
    # the frontend's own conversion equals the shipped API twin (class_type and inputs)
    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    api = load_api(name)
    assert sorted(output, key=int) == sorted(api, key=int)
    for node_id, node in api.items():
        got = output[node_id]
        assert got["class_type"] == node["class_type"], node_id
        assert got["inputs"] == node["inputs"], f"node {node_id} ({node['class_type']})"

    # queue it from the page, as the Queue button does, with tiny models and a small run
    for node_id, values in small_run_values(api, INPUT_SIZE, name).items():
        set_widgets(page, int(node_id), values)
    for node_id in ui_node_ids(page, "FluxKontextImageScale"):  # bypassed (mode 4), as bypass_kontext_scale does
        page.evaluate("(id) => { app.graph.getNodeById(id).mode = 4; }", node_id)
    res = page.evaluate("async () => await app.api.queuePrompt(0, await app.graphToPrompt())")
    assert res.get("prompt_id") and not res.get("node_errors"), res
    entry = server.wait_history(res["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    # the text Padding Check, Rewrite Instruction, Answer and Conversation Turn return is shown on the node
    for cls, start in (("GIEPaddingCheck", "residual padding "), ("GIERewriteInstruction", ""), ("GIEAnswer", ""),
                       ("GIEConversationTurn", "edit")):
        for node_id in ui_node_ids(page, cls):
            page.wait_for_function("([id, start]) => (app.graph.getNodeById(id).gieExecutedText ?? null) !== null"
                                   " && app.graph.getNodeById(id).gieExecutedText.startsWith(start)",
                                   arg=[node_id, start], timeout=30_000)
    page.wait_for_timeout(500)  # the executed images reach the page
    screenshot(page, shots, f"workflow_{name}")
    layout = drawn_layout(page)  # the results shown on the nodes push nothing under another
    assert overlaps({i: tuple(r["rect"]) for i, r in layout.items()}) == []
    assert not page.gie_errors, page.gie_errors


def wait_snap(page, pad: int, start: str) -> str:
    """The Pad To Ratio preview once it starts with ``start`` (the server answers after a short delay)."""
    page.wait_for_function("([id, start]) => (app.graph.getNodeById(id).gieSnapText || '').startsWith(start)",
                           arg=[pad, start], timeout=30_000)
    return page.evaluate("(id) => app.graph.getNodeById(id).gieSnapText", pad)


def test_pad_to_ratio_shows_the_snap_live(page, shots):
    load_ui(page, "pad_edit_crop")
    (pad,) = ui_node_ids(page, "GIEPadToRatio")
    # the example image (80x48, 5:3) loads asynchronously; the line follows, from GET /gie/pad_plan
    assert wait_snap(page, pad, "snaps to") == "snaps to 3:2 -> 81x54\nfrom 80x48: +pad right 1, top 3, bottom 3 px"
    set_widgets(page, pad, {"placement": "top"})
    assert wait_snap(page, pad, "snaps to 3:2 -> 81x54\nfrom 80x48: +pad right 1, bottom") == \
        "snaps to 3:2 -> 81x54\nfrom 80x48: +pad right 1, bottom 6 px"
    set_widgets(page, pad, {"ratios": "kontext"})
    wait_snap(page, pad, "snaps to 83:50 -> 83x50")  # 1328x800 reduced: the nearest to 5:3 in log space
    set_widgets(page, pad, {"custom_ratios": "16:9, 1:1"})
    wait_snap(page, pad, "snaps to 16:9 -> 96x54")
    set_widgets(page, pad, {"custom_ratios": "16:9, x"})  # the node's own message
    assert wait_snap(page, pad, "snap preview: ") == "snap preview: ratio 'x' must be two positive integers like '3:2'"
    set_widgets(page, pad, {"custom_ratios": "", "ratios": "default", "placement": "center"})
    # another image picked in the Load Image node: the line follows once it has loaded
    (load,) = ui_node_ids(page, "LoadImage")
    set_widgets(page, load, {"image": "portrait.png"})
    assert wait_snap(page, pad, "snaps to 2:3 -> 54x81") == "snaps to 2:3 -> 54x81\nfrom 48x80: +pad left 3, right 3, bottom 1 px"
    set_widgets(page, load, {"image": "example.png"})
    wait_snap(page, pad, "snaps to 3:2")
    path = screenshot(page, shots, "pad_to_ratio_preview", [pad])
    assert path.stat().st_size > 10_000
    # the preview line is not part of the prompt or the saved workflow
    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert output[str(pad)]["inputs"] == load_api("pad_edit_crop")[str(pad)]["inputs"]


def test_fusion_connector_shows_only_the_inputs_its_mode_uses(page, shots):
    load_ui(page, "connector_modes_side_by_side")
    state = lambda i: page.evaluate(  # noqa: E731
        """(id) => { const n = app.graph.getNodeById(id);
            return {inputs: n.inputs.map(s => [s.name, s.label ?? null, s.link != null]),
                    hidden: n.gieHiddenInputs, unused: n.gieUnusedInputs}; }""", i)
    by_mode = {page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'mode').value", i): i
               for i in ui_node_ids(page, "GIEFusionConnector")}
    for i in by_mode.values():  # the look is applied once GET /gie/rules has answered
        page.wait_for_function("(id) => app.graph.getNodeById(id).gieHiddenInputs !== undefined", arg=i, timeout=30_000)
    assert set(by_mode) == {"vlm", "vlm+t5", "t5"}

    t5 = state(by_mode["t5"])  # the shipped workflow plugs Qwen features in everywhere: greyed, kept
    assert t5["unused"] == ["qwen_features"] and t5["hidden"] == []
    assert ["qwen_features", "qwen_features (unused in t5)", True] in t5["inputs"]
    vlm = state(by_mode["vlm"])
    assert ["text_features", "text_features (CLIP '' only)", True] in vlm["inputs"] and vlm["unused"] == []
    both = state(by_mode["vlm+t5"])
    assert both["unused"] == [] and [s for s in both["inputs"] if s[0].endswith("_features") and s[1]] == []
    screenshot(page, shots, "fusion_connector_modes", list(by_mode.values()))

    # unplugged in t5 mode, the input disappears; another mode brings it back
    node = by_mode["t5"]
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); n.disconnectInput(n.findInputSlot('qwen_features')); }", node)
    page.wait_for_timeout(200)
    assert state(node)["hidden"] == ["qwen_features"]
    assert "qwen_features" not in [s[0] for s in state(node)["inputs"]]
    screenshot(page, shots, "fusion_connector_t5_hidden", [node])
    set_widgets(page, node, {"mode": "vlm+t5"})
    assert ["qwen_features", None, False] in state(node)["inputs"] and state(node)["hidden"] == []
    set_widgets(page, node, {"mode": "t5"})
    assert state(node)["hidden"] == ["qwen_features"]
    # the prompt of the t5 node no longer names Qwen features; it still validates and matches the node
    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert "qwen_features" not in output[str(node)]["inputs"] and output[str(node)]["inputs"]["mode"] == "t5"


def test_node_help_page_opens_in_the_frontend(page, shots):
    load_ui(page, "pad_edit_crop")
    (pad,) = ui_node_ids(page, "GIEPadToRatio")
    first_line = next(line.lstrip("# ").strip() for line in (REPO / "web/docs/GIEPadToRatio.md").read_text().splitlines()
                      if line.strip())
    focus(page, [pad])
    page.evaluate("(id) => { app.canvas.deselectAll(); app.canvas.selectNode(app.graph.getNodeById(id)); app.canvas.setDirty(true, true); }", pad)
    page.locator("[data-testid='info-button']").first.click(timeout=15_000)
    page.get_by_text(first_line, exact=False).first.wait_for(timeout=15_000)
    screenshot(page, shots, "help_pad_to_ratio", [pad])
