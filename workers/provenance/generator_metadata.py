"""Generation settings that image generators write into the file.

Recognised: AUTOMATIC1111 / Forge / SD.Next (``parameters`` text, also EXIF UserComment in
JPEG/WebP), Fooocus (``parameters`` JSON with ``fooocus_scheme``), ComfyUI (``prompt`` and
``workflow`` JSON), InvokeAI (``invokeai_metadata``, ``invokeai_workflow``,
``invokeai_graph``, ``sd-metadata``, ``Dream``), NovelAI (``Software`` = NovelAI with a
JSON ``Comment``) and OpenAI DALL-E's EXIF note. A chunk is only counted when its content
has the generator's shape (A1111's ``Steps:`` line, ComfyUI's node graph, ...), so a stray
``parameters`` or ``prompt`` keyword from another program is reported but not counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workers.provenance.containers import ContainerMetadata, ExifText, TextEntry
from workers.provenance.findings import (
    MAX_LIST_ITEMS,
    MAX_TEXT_CHARS,
    Finding,
    Kind,
    Report,
    clip,
    error_text,
)

# The settings line is read up to this many characters (real ones are a few hundred).
MAX_SETTINGS_LINE = 16 * 1024
_A1111_STEPS_LINE = re.compile(r"^Steps: \d+", re.MULTILINE)
_A1111_SETTINGS = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Version")
# The legacy InvokeAI "Dream" command line: a quoted prompt, then -s/-S/-W/-H/-C/-A flags.
_DREAM = re.compile(r'\s*"(?:[^"\\]|\\.)*"\s+-[sSWHCAf] ?[^\s-]+\s+-[sSWHCAf]')
# ComfyUI loader inputs that name the generating model.
_COMFY_MODEL_INPUTS = ("ckpt_name", "unet_name")
_COMFY_LOADER_TYPES = ("CheckpointLoader", "UNETLoader", "UnetLoader")
_COMFY_TEXT_NODES = ("CLIPTextEncode",)


@dataclass
class GeneratorInfo:
    """A generator recognised from its metadata."""

    generator: str
    source: str  # where it was found, e.g. "PNG tEXt 'parameters'"
    models: list[str] = field(default_factory=list)
    version: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    note: str | None = None  # replaces "generation settings" when there are none

    @property
    def model(self) -> str | None:
        return self.models[0] if self.models else None

    def add_model(self, name: Any) -> None:
        if isinstance(name, str) and name.strip() and len(self.models) < MAX_LIST_ITEMS:
            name = clip(name.strip())
            if name not in self.models:
                self.models.append(name)

    def details(self) -> dict[str, Any]:
        return {
            "generator": self.generator,
            "model": self.model,
            "models": self.models,
            "version": self.version,
            "source": self.source,
            "prompt": clip(self.prompt, MAX_TEXT_CHARS) if self.prompt else None,
            "negative_prompt": clip(self.negative_prompt, MAX_TEXT_CHARS)
            if self.negative_prompt
            else None,
            "settings": self.settings,
        }

    def sentence(self) -> str:
        if self.note:
            return f"{self.source}: {self.note}"
        model = f", model {clip(self.model, 120)}" if self.model else ""
        name = self.generator
        if self.version:
            version = clip(self.version, 60)
            name = version if version.lower().startswith(name.lower()) else f"{name} {version}"
        return f"{name} generation settings in {self.source}{model}"


# ------------------------------------------------------------------------------ text formats


def parse_a1111(text: str, source: str) -> GeneratorInfo | None:
    """The AUTOMATIC1111 infotext: prompt, ``Negative prompt: ...``, then a line of
    ``Steps: N, Sampler: ..., Model: ...`` settings. None when there is no settings line."""
    matches = list(_A1111_STEPS_LINE.finditer(text))
    if not matches:
        return None
    start = matches[-1].start()
    head, settings_text = text[:start], text[start:]
    prompt, _, negative = head.partition("\nNegative prompt:")
    if head.startswith("Negative prompt:"):
        prompt, negative = "", head[len("Negative prompt:") :]
    params = parse_settings_line(settings_text.splitlines()[0][:MAX_SETTINGS_LINE])
    version = params.get("Version")
    if version and version.startswith("f") and version[1:2].isdigit():
        generator = "Stable Diffusion WebUI Forge"
    elif version and version.lower().startswith("fooocus"):
        generator = "Fooocus"
    else:
        generator = "AUTOMATIC1111 Stable Diffusion WebUI (or a compatible UI)"
    info = GeneratorInfo(
        generator,
        source,
        version=version,
        prompt=prompt.strip() or None,
        negative_prompt=negative.strip() or None,
        settings={k: clip(v) for k, v in params.items() if k in _A1111_SETTINGS},
    )
    info.add_model(params.get("Model"))
    return info


def parse_settings_line(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value", ...`` as A1111 writes it, in one linear pass
    (a regex over a hostile line can backtrack for minutes)."""
    params: dict[str, str] = {}
    position, end = 0, len(line)
    while position < end and len(params) < MAX_LIST_ITEMS:
        colon = line.find(":", position, position + 80)
        if colon < 0:
            break
        key = line[position:colon].strip(" ,")
        position = colon + 1
        while position < end and line[position] == " ":
            position += 1
        if position < end and line[position] == '"':
            value_end = position + 1
            while value_end < end and line[value_end] != '"':
                value_end += 2 if line[value_end] == "\\" else 1
            value = line[position + 1 : min(value_end, end)]
            position = line.find(",", value_end)
        else:
            comma = line.find(",", position)
            value = line[position : comma if comma >= 0 else end]
            position = comma
        if key:
            params[key] = value.strip()
        if position < 0:
            break
        position += 1
    return params


def _fooocus(data: Mapping[str, Any], source: str) -> GeneratorInfo | None:
    version = data.get("version")
    scheme = data.get("metadata_scheme")
    if not (isinstance(version, str) and "fooocus" in version.lower()) and scheme != "fooocus":
        return None
    info = GeneratorInfo(
        "Fooocus",
        source,
        version=version if isinstance(version, str) else None,
        prompt=_string(data.get("prompt")),
        negative_prompt=_string(data.get("negative_prompt")),
        settings=_pick(data, ("steps", "sampler", "seed", "resolution", "performance")),
    )
    info.add_model(data.get("base_model"))
    info.add_model(data.get("refiner_model") if data.get("refiner_model") != "None" else None)
    return info


def _comfy_prompt(data: Any, source: str) -> GeneratorInfo | None:
    """ComfyUI's API-format graph: ``{node_id: {"class_type": ..., "inputs": {...}}}``."""
    if not isinstance(data, dict) or not data:
        return None
    nodes = [
        n for n in data.values() if isinstance(n, dict) and isinstance(n.get("class_type"), str)
    ]
    if not nodes:
        return None
    info = GeneratorInfo("ComfyUI", source, settings={"nodes": len(nodes)})
    texts: list[str] = []
    for node in nodes:
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            continue
        for key in _COMFY_MODEL_INPUTS:
            info.add_model(inputs.get(key))
        if node["class_type"] in _COMFY_TEXT_NODES and isinstance(inputs.get("text"), str):
            texts.append(inputs["text"])
    info.prompt = "\n".join(texts) or None
    return info


def _comfy_workflow(data: Any, source: str) -> GeneratorInfo | None:
    """ComfyUI's UI-format workflow: ``{"nodes": [{"type": ..., "widgets_values": [...]}]}``."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        return None
    nodes = [n for n in data["nodes"] if isinstance(n, dict) and isinstance(n.get("type"), str)]
    if not nodes:
        return None
    info = GeneratorInfo("ComfyUI", source, settings={"nodes": len(nodes)})
    for node in nodes:
        values = node.get("widgets_values")
        if node["type"].startswith(_COMFY_LOADER_TYPES) and isinstance(values, list) and values:
            info.add_model(values[-1] if node["type"] == "CheckpointLoader" else values[0])
    return info


def _invokeai_metadata(data: Any, source: str) -> GeneratorInfo | None:
    if not isinstance(data, dict):
        return None
    info = GeneratorInfo(
        "InvokeAI",
        source,
        version=_string(data.get("app_version")),
        prompt=_string(data.get("positive_prompt")),
        negative_prompt=_string(data.get("negative_prompt")),
        settings=_pick(data, ("generation_mode", "steps", "scheduler", "seed", "width", "height")),
    )
    model = data.get("model")
    if isinstance(model, dict):
        info.add_model(model.get("model_name") or model.get("name"))
    return info


def _invokeai_sd_metadata(data: Any, source: str) -> GeneratorInfo | None:
    if not isinstance(data, dict):
        return None
    info = GeneratorInfo("InvokeAI", source, version=_string(data.get("app_version")))
    info.add_model(data.get("model_weights"))
    image = data.get("image")
    if isinstance(image, dict):
        prompt = image.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            info.prompt = _string(prompt[0].get("prompt"))
        elif isinstance(prompt, str):
            info.prompt = prompt
        info.settings = _pick(image, ("steps", "sampler", "seed", "width", "height"))
    return info


def _novelai(texts: Mapping[str, TextEntry], source: str) -> GeneratorInfo | None:
    software = texts.get("Software")
    if software is None or software.text.strip() != "NovelAI":
        return None
    info = GeneratorInfo("NovelAI", source)
    description = texts.get("Description")
    info.prompt = description.text if description else None
    source_entry = texts.get("Source")
    if source_entry is not None:
        info.add_model(source_entry.text)
    comment = texts.get("Comment")
    if comment is not None:
        data = _json(comment.text)
        if isinstance(data, dict):
            info.negative_prompt = _string(data.get("uc"))
            info.prompt = info.prompt or _string(data.get("prompt"))
            info.settings = _pick(data, ("steps", "sampler", "seed", "scale", "strength"))
    return info


def describe_generation_text(text: str, source: str) -> GeneratorInfo | None:
    """A generator recognised in a free-standing text (a stealth payload, an EXIF comment):
    A1111 infotext, or JSON in the NovelAI / Fooocus / ComfyUI shapes."""
    info = parse_a1111(text, source)
    if info is not None:
        return info
    data = _json(text)
    if not isinstance(data, dict):
        return None
    if data.get("Software") == "NovelAI" or "NovelAI" in str(data.get("Source", ""))[:100]:
        entries = {
            key: TextEntry(key, value if isinstance(value, str) else json.dumps(value), "json")
            for key, value in data.items()
            if key in ("Software", "Description", "Source", "Comment")
        }
        return _novelai(entries, source)
    return _fooocus(data, source) or _comfy_prompt(data, source)


# ------------------------------------------------------------------------------------ driver


class _Texts:
    """A file's text entries by keyword, and how to name where one was found."""

    def __init__(self, meta: ContainerMetadata) -> None:
        self.format = meta.format or "file"
        # The last entry of a keyword, but an intact one over any damaged or cut-short one.
        self.by_keyword: dict[str, TextEntry] = {}
        for entry in meta.texts:
            held = self.by_keyword.get(entry.keyword)
            if held is None or entry.intact or not held.intact:
                self.by_keyword[entry.keyword] = entry

    def get(self, keyword: str) -> TextEntry | None:
        return self.by_keyword.get(keyword)

    def where(self, *entries: TextEntry) -> str:
        kinds = "/".join(dict.fromkeys(e.source for e in entries))
        names = " and ".join(repr(clip(e.keyword, 60)) for e in entries)
        plural = "s" if len(entries) > 1 else ""
        return f"{self.format} {kinds} chunk{plural} {names}"


def generator_findings(
    meta: ContainerMetadata, exif: ExifText | None, report: Report
) -> list[GeneratorInfo]:
    """Findings for every generator recognised in the file's text chunks and EXIF."""
    texts = _Texts(meta)
    candidates = [
        _parameters(texts, report),
        _comfy(texts, report),
        _invokeai(texts, report),
        _novelai_chunks(texts),
    ]
    if (entry := texts.get("comment")) is not None:  # JPEG COM segment
        candidates.append(parse_a1111(entry.text, f"{texts.format} comment segment"))
    if exif is not None:
        candidates.extend(_from_exif(exif, texts.format))
    recognised = [info for info in candidates if info is not None]
    for info in recognised:
        report.add(Finding(Kind.GENERATOR_METADATA, True, info.sentence(), info.details(), rank=20))
    return recognised


def _parameters(texts: _Texts, report: Report) -> GeneratorInfo | None:
    """A1111-style infotext or Fooocus JSON in ``parameters``; a ``parameters`` chunk of
    another shape is reported, not counted."""
    entry = texts.get("parameters")
    if entry is None:
        return None
    scheme = texts.get("fooocus_scheme")
    info = parse_a1111(entry.text, texts.where(entry))
    if info is None:
        data = _json(entry.text)
        if isinstance(data, dict):
            info = _fooocus(data, texts.where(entry))
    if info is None and scheme is not None:
        info = GeneratorInfo("Fooocus", texts.where(entry, scheme))
    if info is not None:
        if scheme is not None:
            info.generator = "Fooocus"
        return info
    report.add(
        Finding(
            Kind.GENERATOR_METADATA,
            False,
            f"{texts.where(entry)} is present but does not hold recognisable generation settings",
            {"keyword": "parameters", "text": clip(entry.text, 200)},
        )
    )
    return None


def _comfy(texts: _Texts, report: Report) -> GeneratorInfo | None:
    info: GeneratorInfo | None = None
    prompt_entry, workflow_entry = texts.get("prompt"), texts.get("workflow")
    if prompt_entry is not None:
        where = texts.where(prompt_entry)
        info = _comfy_prompt(_json(prompt_entry.text, report, where), where)
    if workflow_entry is not None:
        where = texts.where(workflow_entry)
        from_workflow = _comfy_workflow(_json(workflow_entry.text, report, where), where)
        if info is None:
            info = from_workflow
        elif from_workflow is not None and prompt_entry is not None:
            info.source = texts.where(prompt_entry, workflow_entry)
            for model in from_workflow.models:
                info.add_model(model)
    return info


def _invokeai(texts: _Texts, report: Report) -> GeneratorInfo | None:
    if (entry := texts.get("invokeai_metadata")) is not None:
        where = texts.where(entry)
        info = _invokeai_metadata(_json(entry.text, report, where), where)
        if info is not None:
            return info
    if (entry := texts.get("sd-metadata")) is not None:
        where = texts.where(entry)
        info = _invokeai_sd_metadata(_json(entry.text, report, where), where)
        if info is not None:
            return info
    for keyword in ("invokeai_graph", "invokeai_workflow"):
        if (entry := texts.get(keyword)) is not None and isinstance(_json(entry.text), dict):
            return GeneratorInfo("InvokeAI", texts.where(entry))
    if (entry := texts.get("Dream")) is not None and _DREAM.match(entry.text[:4096]):
        return GeneratorInfo("InvokeAI (legacy dream)", texts.where(entry), prompt=entry.text)
    return None


def _novelai_chunks(texts: _Texts) -> GeneratorInfo | None:
    entries = [e for k in ("Software", "Comment") if (e := texts.get(k)) is not None]
    if not entries or entries[0].keyword != "Software":
        return None
    return _novelai(texts.by_keyword, texts.where(*entries))


def _from_exif(exif: ExifText, fmt: str) -> list[GeneratorInfo]:
    found: list[GeneratorInfo] = []
    comment = exif.user_comment or ""
    if comment:
        info = describe_generation_text(comment, f"{fmt} EXIF UserComment")
        if info is not None:
            found.append(info)
    maker_note = exif.maker_note or ""
    if "Made with OpenAI DALL-E" in comment or maker_note.startswith("OpenAI--"):
        info = GeneratorInfo("OpenAI DALL-E", f"{fmt} EXIF")
        info.settings = {"user_comment": clip(comment, 200), "maker_note": clip(maker_note, 100)}
        info.note = (
            f"UserComment {clip(comment, 80)!r}, MakerNote {clip(maker_note, 60)!r}: "
            "written by OpenAI's DALL-E"
        )
        found.append(info)
    if exif.software == "NovelAI":
        info = GeneratorInfo("NovelAI", f"{fmt} EXIF", note="Software is 'NovelAI'")
        info.prompt = exif.image_description
        found.append(info)
    return found


# ----------------------------------------------------------------------------------- helpers


def _json(text: str, report: Report | None = None, where: str = "") -> Any:
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return None
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError) as exc:
        if report is not None:
            report.error(f"{where} is not valid JSON: {error_text(exc)}")
        return None


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _pick(data: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    picked: dict[str, Any] = {}
    for key in keys:
        value = data.get(key)
        if isinstance(value, str | int | float | bool):
            picked[key] = clip(value) if isinstance(value, str) else value
    return picked
