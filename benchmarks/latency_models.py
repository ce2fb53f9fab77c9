"""Models of the latency benchmark (``benchmarks/latency.py``), and the hook for adding one.

A model is described by a :class:`BenchModel`: the FP32 ``torch.nn.Module``
(one tensor in, one tensor out, eval mode), real inputs of a fixed length
(``inputs``: at least as many samples as the largest batch measured) and
calibration batches (``calibration``) for the W8A8 quantization.

Built-in (``--models``):

* ``whisper_encoder``: the Whisper tiny.en encoder (``../shared/models/whisper-tiny.en``),
  input (batch, 80, 3000) log-mel (30 s, the only length the encoder accepts),
  output (batch, 1500, 384); inputs and calibration are the shared transcribed
  clips (SpeechBrain samples, LJSpeech).
* ``honk``: honk res8-narrow (``../shared/models/honk/res8_narrow.pt``), input
  (batch, 101, 40) MFCC of 1 s Speech Commands clips, output (batch, 12) logits.
* ``conformer_ctc``: the in-project SpeechBrain Conformer-CTC
  (``recipes/SpeechCommands/ASR/conformer_ctc``), from the run folder the
  recipe's training command wrote (``$ESC_CONFORMER_CTC_RUN``, default
  ``results/conformer_ctc/1986``); input (batch, 101, 40) normalised fbank of
  1 s test clips, output (batch, 25, 17) CTC logits. Not in the default list:
  it exists only after the recipe has been trained.
* ``ast`` / ``ecapa``: the in-project AST (``recipes/SpeechCommands/KWS/ast``,
  fbank 101x64 of 1 s Speech Commands clips -> 12 logits) and ECAPA-TDNN
  (``recipes/LibriSpeech/SpeakerRec/ecapa``, fbank of 3 s LibriSpeech speech
  -> embedding), built from the recipe's hparams with **random weights**
  (seed 0): the trained runs are not on every machine, and the weights do
  not change the latency.

Adding a model (e.g. an in-project Conformer): ``--model package.module:function``
where ``function(shared_root)`` returns a :class:`BenchModel` or a dict with the
same fields (only ``name``, ``model``, ``inputs``, ``calibration`` are required)::

    def build(shared_root):
        model = load_my_conformer(...).eval()       # forward(feats) -> tensor
        feats = real_features(shared_root, n=8)     # (8, time, n_mels), one fixed length
        return {"name": "conformer-small", "model": model, "inputs": feats,
                "calibration": [feats[:4], feats[4:]],
                "quant_config": {"exclude": ["*.pos_emb*"]}}   # optional QuantConfig fields

The function is called again by the measure phase (``--measure``) to rebuild
the FP32 model for the PyTorch row; when that fails (package or weights
missing on the measuring machine) the PyTorch row is skipped with the reason.
"""
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

N_INPUTS = 8  # real samples kept for the measure phase (the largest default batch)


class BenchmarkError(ValueError):
    """Bad benchmark input; the message names the fix."""


@dataclass
class BenchModel:
    """One model of the latency benchmark.

    Arguments
    ---------
    name : str
        Identifier used for file names and tables.
    model : torch.nn.Module
        FP32 model in eval mode; ``model(x)`` returns one tensor.
    inputs : torch.Tensor
        Real inputs, (n, ...) with one fixed length; batch b uses the first b
        (repeated if n < b).
    calibration : list of torch.Tensor
        Batches run through the model to calibrate the W8A8 scales.
    input_name, output_name : str
        ONNX tensor names.
    description : str
        One line for the tables (architecture, input).
    quant_config : dict
        Extra ``esc.QuantConfig`` fields (bits=8, method="max" by default).
    """

    name: str
    model: torch.nn.Module
    inputs: torch.Tensor
    calibration: List[torch.Tensor]
    input_name: str = "feats"
    output_name: str = "out"
    description: str = ""
    quant_config: Dict = field(default_factory=dict)


class WhisperEncoder(torch.nn.Module):
    """Whisper's encoder as ``log-mel (B, 80, 3000) -> hidden states (B, 1500, d_model)``."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, mel):
        return self.encoder(mel).last_hidden_state


def build_whisper_encoder(shared_root=None, n_calib: int = 2) -> BenchModel:
    """Whisper tiny.en encoder; inputs = 8 shared clips, calibration = ``n_calib`` others."""
    from esc_plugin.tasks.audio import resolve_shared_root
    from esc_plugin.tasks.whisper import load_clips, load_whisper, log_mel

    root = resolve_shared_root(shared_root)
    model, feature_extractor, _ = load_whisper(root)
    clips = sorted(load_clips(root), key=lambda c: c["id"])
    if len(clips) < N_INPUTS + n_calib:
        raise BenchmarkError(f"need {N_INPUTS + n_calib} transcribed clips in {root}/data, "
                             f"found {len(clips)}.")
    feats = log_mel(feature_extractor, [c["wav"] for c in clips[:N_INPUTS + n_calib]])
    return BenchModel(
        name="whisper_encoder", model=WhisperEncoder(model.model.encoder).eval(),
        inputs=feats[:N_INPUTS], calibration=[feats[N_INPUTS:]],
        input_name="mel", output_name="hidden",
        description="Whisper tiny.en encoder (2 Conv1d + 4 transformer layers, d 384), "
                    "log-mel 80x3000 (30 s)")


def build_honk(shared_root=None, n_calib: int = 32) -> BenchModel:
    """honk res8-narrow; inputs = 8 Speech Commands clips, calibration = ``n_calib`` others."""
    from esc_plugin.tasks.audio import load_audio, pad_or_trim, require_path, resolve_shared_root
    from esc_plugin.tasks.honk import (LABELS, N_SAMPLES, SAMPLE_RATE, VARIANTS, compute_mfcc,
                                       list_clips, load_res8)

    root = resolve_shared_root(shared_root)
    ckpt = require_path(root / "models" / "honk" / "res8_narrow.pt", "honk checkpoint res8_narrow.pt")
    model = load_res8(ckpt, VARIANTS["res8_narrow"], len(LABELS))
    clips = list_clips(require_path(root / "data" / "speech_commands", "Speech Commands data"))
    picked = clips[:: max(1, len(clips) // (N_INPUTS + n_calib))][:N_INPUTS + n_calib]
    wavs = torch.stack([pad_or_trim(load_audio(p, SAMPLE_RATE), N_SAMPLES) for p, _ in picked])
    feats = compute_mfcc(wavs)
    return BenchModel(
        name="honk", model=model, inputs=feats[:N_INPUTS], calibration=[feats[N_INPUTS:]],
        input_name="mfcc", output_name="logits",
        description="honk res8-narrow (7 Conv2d 3x3, 19 maps), MFCC 101x40 (1 s)")


class ConformerCTC(torch.nn.Module):
    """The recipe's CNN front end + Conformer encoder + CTC head: normalised fbank -> logits."""

    def __init__(self, cnn, transformer, ctc_lin):
        super().__init__()
        self.cnn, self.transformer, self.ctc_lin = cnn, transformer, ctc_lin

    def forward(self, feats):
        lengths = torch.ones(feats.shape[0], device=feats.device)  # fixed-length inputs
        return self.ctc_lin(self.transformer.encode(self.cnn(feats), lengths))


def build_conformer_ctc(shared_root=None, n_calib: int = 32) -> BenchModel:
    """The trained SpeechBrain Conformer-CTC; inputs = 8 test clips, calibration = calibration clips."""
    import json
    import os

    from hyperpyyaml import load_hyperpyyaml

    from esc_plugin.tasks.audio import load_audio, pad_or_trim, resolve_shared_root

    data_root = resolve_shared_root(shared_root) / "data" / "speech_commands"
    repo = Path(__file__).resolve().parents[1]
    recipe = repo / "recipes" / "SpeechCommands" / "ASR" / "conformer_ctc"
    run = Path(os.environ.get("ESC_CONFORMER_CTC_RUN", repo / "results" / "conformer_ctc" / "1986"))
    if not (run / "save").is_dir() or not (run / "manifests" / "test.json").is_file():
        raise BenchmarkError(
            f"no trained Conformer-CTC in {run}: train it first with `python {recipe}/train.py "
            f"{recipe}/hparams/conformer_ctc.yaml --data_folder=../shared/data/speech_commands` "
            "(or point ESC_CONFORMER_CTC_RUN at its output folder).")
    with open(recipe / "hparams" / "conformer_ctc.yaml") as f:
        hp = load_hyperpyyaml(f, {"data_folder": "unused", "output_folder": str(run)})
    hp["checkpointer"].recover_if_possible()

    def feats_of(manifest, n):
        with open(run / "manifests" / manifest) as f:
            items = sorted(json.load(f).values(), key=lambda e: e["wav"])[:n]
        wavs = torch.stack([pad_or_trim(load_audio(e["wav"].format(data_root=data_root), hp["sample_rate"]),
                                        hp["sample_rate"])
                            for e in items])
        with torch.no_grad():
            feats = hp["compute_features"](wavs)
            return hp["normalize"].eval()(feats, torch.ones(len(items)))

    inputs, calib = feats_of("test.json", N_INPUTS), feats_of("calib.json", n_calib)
    return BenchModel(
        name="conformer_ctc", model=ConformerCTC(hp["CNN"], hp["Transformer"], hp["ctc_lin"]).eval(),
        inputs=inputs, calibration=[calib], input_name="fbank", output_name="logits",
        description=f"in-project SpeechBrain Conformer-CTC ({hp['num_encoder_layers']} layers, d "
                    f"{hp['d_model']}, RelPosMHAXL), fbank 101x40 (1 s)")


def _recipe_hparams(recipe, yaml_name, extra_overrides=None):
    """A recipe's hparams (hyperpyyaml), its model randomly initialised (seed 0): latency only."""
    import sys
    import tempfile

    from hyperpyyaml import load_hyperpyyaml

    folder = Path(__file__).resolve().parents[1] / "recipes" / recipe
    if str(folder) not in sys.path:  # the recipe's own model module (e.g. audio_spectrogram_transformer)
        sys.path.insert(0, str(folder))
    torch.manual_seed(0)
    with open(folder / "hparams" / yaml_name) as f:
        return load_hyperpyyaml(f, {"data_folder": "unused", "output_folder": tempfile.mkdtemp(),
                                    **(extra_overrides or {})}), folder


def _speech_commands_wavs(shared_root, n, seconds=1.0):
    from esc_plugin.tasks.audio import load_audio, pad_or_trim, require_path, resolve_shared_root
    from esc_plugin.tasks.honk import list_clips

    root = resolve_shared_root(shared_root)
    clips = list_clips(require_path(root / "data" / "speech_commands", "Speech Commands data"))
    picked = clips[:: max(1, len(clips) // n)][:n]
    return torch.stack([pad_or_trim(load_audio(p, 16000), int(16000 * seconds)) for p, _ in picked])


class FeatsToLogits(torch.nn.Module):
    """A recipe model called as ``model(feats)`` (AST), or ``model(feats)`` of an embedding model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, feats):
        return self.model(feats)


class ASTForExport(torch.nn.Module):
    """The recipe's AST forward with the batch size read from the tensor, not ``len()`` (which the
    TorchScript exporter bakes in as a constant: the exported graph would only run at the example's batch)."""

    def __init__(self, ast):
        super().__init__()
        self.ast = ast

    def forward(self, feats):
        a = self.ast
        tokens = a.patch_embedding(feats.unsqueeze(1)).flatten(2).transpose(1, 2)
        tokens = torch.cat([a.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        encoded, _ = a.encoder(a.embedding_dropout(tokens + a.position_embedding))
        return a.head(encoded[:, 0])


def build_ast(shared_root=None, n_calib: int = 16) -> BenchModel:
    """The in-project AST (``recipes/SpeechCommands/KWS/ast``), randomly initialised: latency only."""
    hp, _ = _recipe_hparams("SpeechCommands/KWS/ast", "ast.yaml")
    with torch.no_grad():
        feats = hp["compute_features"](_speech_commands_wavs(shared_root, N_INPUTS + n_calib))
    return BenchModel(
        name="ast", model=ASTForExport(hp["ast"]).eval(), inputs=feats[:N_INPUTS],
        calibration=[feats[N_INPUTS:]], input_name="fbank", output_name="logits",
        description=f"in-project AST ({hp['num_layers']} layers, d {hp['d_model']}, patches "
                    f"{hp['patch_size']}), random weights, fbank {feats.shape[1]}x{feats.shape[2]} (1 s)")


def build_ecapa(shared_root=None, n_calib: int = 16) -> BenchModel:
    """The in-project ECAPA-TDNN (``recipes/LibriSpeech/SpeakerRec/ecapa``), randomly initialised:
    latency only; 3 s of LibriSpeech speech per input."""
    from esc_plugin.tasks.audio import load_audio, pad_or_trim, require_path, resolve_shared_root

    hp, _ = _recipe_hparams("LibriSpeech/SpeakerRec/ecapa", "ecapa.yaml")
    root = resolve_shared_root(shared_root)
    files = sorted(require_path(root / "data" / "librispeech_speakers", "LibriSpeech speakers").glob("*/*.flac"))
    files = files[:: max(1, len(files) // (N_INPUTS + n_calib))][:N_INPUTS + n_calib]
    wavs = torch.stack([pad_or_trim(load_audio(f, 16000), 48000) for f in files])
    with torch.no_grad():
        feats = hp["compute_features"](wavs)
    return BenchModel(
        name="ecapa", model=FeatsToLogits(hp["embedding_model"]).eval(), inputs=feats[:N_INPUTS],
        calibration=[feats[N_INPUTS:]], input_name="fbank", output_name="embedding",
        description=f"in-project ECAPA-TDNN (channels {hp['channels']}, embedding {hp['emb_dim']}), "
                    f"random weights, fbank {feats.shape[1]}x{feats.shape[2]} (3 s)")


BUILTINS = {"whisper_encoder": build_whisper_encoder, "honk": build_honk, "conformer_ctc": build_conformer_ctc,
            "ast": build_ast, "ecapa": build_ecapa}


def builder_of(source: str):
    """The builder function of a built-in name or of ``package.module:function``."""
    if source in BUILTINS:
        return BUILTINS[source]
    if ":" not in source:
        raise BenchmarkError(f"unknown model {source!r}: use one of {sorted(BUILTINS)} or "
                             "--model package.module:function (see benchmarks/latency_models.py).")
    module, func = source.split(":", 1)
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise BenchmarkError(f"cannot load the model builder {source!r}: {exc}. Run from the "
                             "repository root or put the package on PYTHONPATH.") from exc


def as_bench_model(obj, source: str) -> BenchModel:
    """Normalise what a builder returned (BenchModel, dict, or an object with the fields)."""
    if isinstance(obj, BenchModel):
        spec = obj
    else:
        get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
        missing = [k for k in ("name", "model", "inputs", "calibration") if get(k) is None]
        if missing:
            raise BenchmarkError(f"the builder {source!r} returned no {missing}: return a "
                                 "BenchModel or a dict with name, model, inputs, calibration.")
        spec = BenchModel(**{k: get(k) for k in BenchModel.__dataclass_fields__ if get(k) is not None})
    if not isinstance(spec.model, torch.nn.Module):
        raise BenchmarkError(f"{source!r}: model must be a torch.nn.Module, got {type(spec.model).__name__}.")
    if not torch.is_tensor(spec.inputs) or spec.inputs.dim() < 2 or spec.inputs.dtype != torch.float32:
        raise BenchmarkError(f"{source!r}: inputs must be a float32 tensor (n, ...) of real samples, "
                             f"got {getattr(spec.inputs, 'shape', type(spec.inputs))}.")
    if isinstance(spec.calibration, torch.Tensor):
        spec.calibration = [spec.calibration]
    if not spec.calibration:
        raise BenchmarkError(f"{source!r}: calibration must be a non-empty list of input batches.")
    spec.model.eval()
    return spec


def build(source: str, shared_root: Optional[Path] = None) -> BenchModel:
    """Build the :class:`BenchModel` of a built-in name or ``package.module:function``."""
    return as_bench_model(builder_of(source)(shared_root), source)
