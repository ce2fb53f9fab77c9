"""Save a quantized NeMo model as a ``.nemo`` and restore it with its quantizers.

What a quantized ``.nemo`` holds (NeMo's tar layout, written by
:class:`QuantizedSaveRestoreConnector`):

* ``model_config.yaml``: the FP32 model's config plus an ``esc_quantization``
  section (method, bits, the state file's name);
* ``model_weights.ckpt``: the FP32 weights only (quantization never changes
  them; the quantizers' buffers are left out), so NeMo's plain
  ``ASRModel.restore_from`` still opens the file, as the FP32 model;
* ``esc_quantization.pt``: the esc_plugin state (``esc.save``: scales, call
  sites, report, fingerprint of the weights).

Restoring (``restore_quantized_asr_model(path)``, or NeMo's
``ASRModel.restore_from(path, save_restore_connector=QuantizedSaveRestoreConnector())``)
rebuilds the FP32 model with NeMo, then the quantized model with ``esc.load``:
outputs are identical to the model that was saved. The ``.nemo`` is written to
a temporary file beside the target and renamed (atomic), and a target that is
an FP32 ``.nemo`` (no esc_plugin state inside) is never overwritten.
"""
import functools
import os
import tarfile
import tempfile

import esc_plugin as esc

from ..core.io import atomic_path
from ._modules import import_nemo_asr, quantizable, rebind_copied_forwards
from .errors import NemoModelError
from .model import is_quantized_asr_model, quantized_class

STATE_FILE = "esc_quantization.pt"
CONFIG_KEY = "esc_quantization"


def _tar_members(path):
    try:
        with tarfile.open(path, "r:*") as tar:
            return {os.path.normpath(m.name) for m in tar.getmembers()}
    except (tarfile.TarError, OSError) as exc:
        raise NemoModelError(f"{path} is not a .nemo file (NeMo's tar archive): {exc}") from exc


def holds_quantization_state(path):
    """True if the ``.nemo`` at ``path`` was written by esc_plugin (holds ``esc_quantization.pt``)."""
    return STATE_FILE in _tar_members(path)


def _quantizer_prefixes(model):
    from ..core.quantizers import TensorQuantizer
    return tuple(name + "." for name, m in model.named_modules() if isinstance(m, TensorQuantizer))


@functools.lru_cache(maxsize=None)
def _connector_class():
    from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

    class QuantizedSaveRestoreConnector(SaveRestoreConnector):
        """NeMo ``SaveRestoreConnector`` for esc_plugin-quantized models (see the module doc)."""

        def save_to(self, model, save_path):
            if not is_quantized_asr_model(model):
                raise NemoModelError(f"{type(model).__name__} is not quantized: save FP32 models with "
                                     "NeMo's default connector (model.save_to).")
            save_path = os.fspath(save_path)
            if os.path.exists(save_path) and not holds_quantization_state(save_path):
                raise NemoModelError(
                    f"{save_path} is an FP32 .nemo (no esc_plugin state inside): refusing to overwrite "
                    "it. Save the quantized model to a new file, e.g. 'model_w8a8.nemo'.")
            self._esc_model = model
            try:
                return super().save_to(model, save_path)
            finally:
                del self._esc_model

        def _save_state_dict_to_disk(self, state_dict, filepath):
            # The weights file holds FP32 weights only; the quantizers go to STATE_FILE.
            model = self._esc_model
            prefixes = _quantizer_prefixes(model)
            weights = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
            super()._save_state_dict_to_disk(weights, filepath)
            folder = os.path.dirname(filepath)
            esc.save(model, os.path.join(folder, STATE_FILE))
            self._add_config_section(model, os.path.join(folder, self.model_config_yaml))

        @staticmethod
        def _add_config_section(model, config_yaml):
            from omegaconf import OmegaConf
            conf = OmegaConf.load(config_yaml)
            cfg = model.esc_plan.config
            conf[CONFIG_KEY] = {"state_file": STATE_FILE, "method": cfg.method,
                                "weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits,
                                "restore_with": "esc_plugin.nemo.restore_quantized_asr_model"}
            OmegaConf.save(conf, config_yaml)

        def _make_nemo_file_from_folder(self, filename, source_dir):
            with atomic_path(filename) as tmp:
                SaveRestoreConnector._make_nemo_file_from_folder(tmp, source_dir)

        def restore_from(self, calling_cls, restore_path, override_config_path=None, map_location=None,
                         strict=True, return_config=False, trainer=None, validate_access_integrity=True):
            if not return_config and not holds_quantization_state(restore_path):
                raise NemoModelError(
                    f"{restore_path} holds no esc_plugin state ({STATE_FILE}): it is an FP32 .nemo. "
                    "Restore it with ASRModel.restore_from(path), or quantize it with "
                    "esc_plugin.nemo.quantize_asr_model.")
            fp32 = super().restore_from(calling_cls, restore_path, override_config_path, map_location,
                                        strict, return_config, trainer, validate_access_integrity)
            if return_config:
                return fp32
            with tempfile.TemporaryDirectory() as tmp:
                self._unpack_nemo_file(restore_path, tmp, members=[f"./{STATE_FILE}"])
                return load_quantization_state(fp32, os.path.join(tmp, STATE_FILE))

    QuantizedSaveRestoreConnector.__module__ = __name__
    return QuantizedSaveRestoreConnector


def as_quantized_asr_model(qmodel):
    """Give a model from ``esc.quantize`` / ``esc.load`` the quantized NeMo class and connector."""
    rebind_copied_forwards(qmodel)  # the copy's mel front end must run the copy, not the FP32 model
    qmodel.__class__ = quantized_class(type(qmodel))
    qmodel._save_restore_connector = _connector_class()()
    return qmodel


def load_quantization_state(asr_model, state_path):
    """``esc.load`` for a NeMo model: the quantized copy of ``asr_model`` from an ``esc.save`` file."""
    with quantizable(asr_model):
        qmodel = esc.load(asr_model, state_path)
    return as_quantized_asr_model(qmodel)


def save_quantized_asr_model(qmodel, save_path):
    """Write ``qmodel`` (from :func:`~esc_plugin.nemo.quantize_asr_model`) to a new ``.nemo``; returns the path."""
    if not is_quantized_asr_model(qmodel):
        raise NemoModelError(f"{type(qmodel).__name__} is not a quantized NeMo model: pass the model "
                             "returned by esc_plugin.nemo.quantize_asr_model.")
    connector = _connector_class()()
    # ModelPT.save_to creates the folder, then hands over to the connector.
    previous, qmodel._save_restore_connector = qmodel._save_restore_connector, connector
    try:
        import nemo.core.classes.modelPT as modelpt
        modelpt.ModelPT.save_to(qmodel, os.fspath(save_path))
    finally:
        qmodel._save_restore_connector = previous
    return os.fspath(save_path)


def restore_quantized_asr_model(path, map_location="cpu", trainer=None):
    """Restore a quantized ``.nemo`` written by :func:`save_quantized_asr_model`.

    Returns the ``Quantized<cls>`` model, with outputs identical to the saved one.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NemoModelError(f"{path} not found: pass a .nemo written by qmodel.save_to(...).")
    nemo_asr = import_nemo_asr()
    return nemo_asr.models.ASRModel.restore_from(path, map_location=map_location, trainer=trainer,
                                                 save_restore_connector=_connector_class()())


def __getattr__(name):
    if name == "QuantizedSaveRestoreConnector":
        return _connector_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
