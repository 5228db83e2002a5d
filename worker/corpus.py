"""Reading the FAQ corpus: the built-in one, a local file, or a URL downloaded once and cached."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

from shared.errors import CorpusError

BUILTIN = "builtin"
DOWNLOAD_TIMEOUT_S = 60
MAX_CORPUS_BYTES = 512 * 1024 * 1024


def document_id(course: str, question: str, text: str) -> str:
    """The course's id rule, which reproduces the ids of documents-with-ids.json."""
    return hashlib.md5(f"{course}-{question}-{text[:10]}".encode()).hexdigest()[:8]


def load_documents(source: str | None, cache_dir: Path) -> list[dict[str, Any]]:
    """Flat documents with `course` and `id`, from the built-in corpus, a path, or an http(s) URL."""
    if source is None or source == BUILTIN:
        raw = resources.files("worker").joinpath("builtin_faq.json").read_text(encoding="utf-8")
        origin = "the built-in corpus"
    else:
        path = _download(source, cache_dir) if source.startswith(("http://", "https://")) else Path(source)
        origin = source
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CorpusError(f"RAGQ_DOCUMENTS {source!r} cannot be read: {exc.strerror or exc}") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{origin} is not valid JSON: {exc}") from exc
    return normalise(data, origin)


def normalise(data: Any, origin: str = "corpus") -> list[dict[str, Any]]:
    """Accept the nested `[{course, documents: [...]}]` form or a flat list with a `course` field."""
    if not isinstance(data, list) or not data:
        raise CorpusError(f"{origin} must be a non-empty JSON list")
    flat: list[dict[str, Any]] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise CorpusError(f"{origin}: entry {i} is not an object")
        if "documents" in item:
            course = item.get("course")
            if not isinstance(course, str) or not isinstance(item["documents"], list):
                raise CorpusError(f"{origin}: entry {i} needs a string `course` and a list `documents`")
            flat += [{**doc, "course": course} for doc in item["documents"] if isinstance(doc, dict)]
        else:
            flat.append(dict(item))
    for i, doc in enumerate(flat):
        for name in ("course", "question", "text"):
            if not isinstance(doc.get(name), str):
                raise CorpusError(f"{origin}: document {i} has no string field {name!r}")
        doc.setdefault("section", "")
        doc.setdefault("id", document_id(doc["course"], doc["question"], doc["text"]))
    return flat


def _download(url: str, cache_dir: Path) -> Path:
    """Fetch `url` once; later starts read the cached copy."""
    target = cache_dir / "corpus" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".json")
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            body = response.read(MAX_CORPUS_BYTES + 1)
    except OSError as exc:
        raise CorpusError(f"RAGQ_DOCUMENTS {url!r} could not be downloaded: {exc}") from exc
    if len(body) > MAX_CORPUS_BYTES:
        raise CorpusError(f"RAGQ_DOCUMENTS {url!r} is larger than {MAX_CORPUS_BYTES} bytes")
    partial.write_bytes(body)
    # Rename, so a worker starting at the same moment never reads a half-written file.
    partial.replace(target)
    return target
