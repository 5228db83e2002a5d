"""Uploaded files (`/v1/files`, OpenAI's shape) in Redis: written in chunks, committed whole under per-tenant caps.

Files live in Redis, not on an API process's disk: every API replica must be able to read a file another one
accepted (the upload and the `POST /v1/batches` naming it may land on different replicas). Redis memory is
bounded by the per-tenant caps (`RAGQ_MAX_FILE_BYTES_PER_TENANT`, `RAGQ_MAX_FILES_PER_TENANT`) and a TTL.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import redis

from shared import redis_keys
from shared.errors import NotFound, TooManyRequests, Unavailable, ValidationFailed
from shared.lua import with_now

CHUNK_BYTES = 64 * 1024
# Seconds uploaded chunks live before the file is committed (an upload cut off leaves nothing for long).
STAGING_TTL_S = 900
PURPOSES = ("batch",)
CAP_RETRY_AFTER_S = 60

# KEYS: [1] file hash, [2] chunks list, [3] tenant's files. ARGV: [1] metadata (JSON object), [2] bytes,
# [3] member `<id>:<bytes>`, [4] TTL, [5] files cap, [6] bytes cap, [7] chunk count.
# Drops the tenant's expired files from its index, checks both caps, then makes the staged file real.
_COMMIT_LUA = with_now("""
local now = tonumber(now())
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local members = redis.call('ZRANGE', KEYS[3], 0, -1)
if #members >= tonumber(ARGV[5]) then return {'files', #members} end
local used = 0
for _, member in ipairs(members) do used = used + tonumber(string.match(member, ':(%d+)$')) end
if used + tonumber(ARGV[2]) > tonumber(ARGV[6]) then return {'bytes', used} end
if redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[7]) then return {'missing', 0} end
local ttl = tonumber(ARGV[4])
for name, value in pairs(cjson.decode(ARGV[1])) do redis.call('HSET', KEYS[1], name, value) end
redis.call('EXPIRE', KEYS[1], ttl)
if tonumber(ARGV[7]) > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
redis.call('ZADD', KEYS[3], now + ttl, ARGV[3])
redis.call('EXPIRE', KEYS[3], ttl)
return {'ok', 0}
""")


@dataclass(frozen=True)
class FileLimits:
    max_bytes: int
    max_files: int
    ttl_s: int


@dataclass(frozen=True)
class StoredFile:
    """An uploaded file's metadata."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int

    def to_public(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


class FileStore:
    """All reads and writes of uploaded files."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._commit = client.register_script(_COMMIT_LUA)

    def create(self, tenant: str, filename: str, purpose: str, source: IO[bytes], limits: FileLimits, max_bytes: int) -> StoredFile:
        """Copy `source` into Redis chunk by chunk (never whole in memory), then commit it under the tenant's caps.

        The content must be UTF-8 (batch input is JSONL); refused whole, nothing kept, otherwise.
        """
        file_id = new_file_id()
        chunks_key = redis_keys.file_chunks(file_id)
        decoder = codecs.getincrementaldecoder("utf-8")()
        size = 0
        count = 0
        try:
            while True:
                raw = source.read(CHUNK_BYTES)
                final = not raw
                size += len(raw)
                if size > max_bytes:
                    raise ValidationFailed(f"the file is larger than {max_bytes} bytes", details={"max_bytes": max_bytes})
                try:
                    text = decoder.decode(raw, final=final)
                except UnicodeDecodeError as exc:
                    raise ValidationFailed(f"the file is not UTF-8 text: {exc}") from exc
                if text:
                    pipe = self.redis.pipeline(transaction=False)
                    pipe.rpush(chunks_key, text)
                    pipe.expire(chunks_key, STAGING_TTL_S)
                    pipe.execute()
                    count += 1
                if final:
                    break
            now = int(time.time())
            stored = StoredFile(file_id, tenant, filename, purpose, size, now, now + limits.ttl_s)
            meta = {name: str(value) for name, value in stored.__dict__.items()}
            outcome, figure = self._commit(
                keys=[redis_keys.file(file_id), chunks_key, redis_keys.tenant_files(tenant)],
                args=[json.dumps(meta), size, f"{file_id}:{size}", limits.ttl_s, limits.max_files, limits.max_bytes, count],
            )
        except BaseException:
            try:
                self.redis.delete(chunks_key)
            except redis.RedisError:
                pass
            raise
        _raise_refusal(str(outcome), int(figure), size, limits)
        return stored

    def get(self, file_id: str, tenant: str) -> StoredFile:
        """The file's metadata; another tenant's file is not found, as if it did not exist."""
        fields = self.redis.hgetall(redis_keys.file(file_id))
        if not fields or fields.get("tenant") != tenant:
            raise NotFound(f"no file with id {file_id!r}")
        return StoredFile(
            id=fields["id"], tenant=fields["tenant"], filename=fields["filename"], purpose=fields["purpose"],
            bytes=int(fields["bytes"]), created_at=int(fields["created_at"]), expires_at=int(fields["expires_at"]),
        )

    def chunks(self, file_id: str) -> Iterator[str]:
        """The file's content as text chunks, read a few at a time."""
        start = 0
        while True:
            part = self.redis.lrange(redis_keys.file_chunks(file_id), start, start + 15)
            if not part:
                return
            yield from part
            start += len(part)

    def lines(self, file_id: str) -> Iterator[tuple[int, str]]:
        """The file's non-blank lines numbered from 1 (blank lines count), joined across chunks."""
        number = 0
        carry = ""
        first = True
        for chunk in self.chunks(file_id):
            if first:
                chunk = chunk.removeprefix("\ufeff")
                first = False
            parts = (carry + chunk).split("\n")
            carry = parts.pop()
            for line in parts:
                number += 1
                if line.strip():
                    yield number, line
        if carry.strip():
            yield number + 1, carry

    def listing(self, tenant: str, limit: int, purpose: str | None) -> tuple[list[dict[str, Any]], bool]:
        """The tenant's files, newest first (at most `limit`), and whether there are more."""
        members = self.redis.zrevrangebyscore(redis_keys.tenant_files(tenant), "+inf", time.time())
        page = []
        for member in members:
            file_id = member.rsplit(":", 1)[0]
            try:
                found = self.get(file_id, tenant)
            except NotFound:
                continue
            if purpose is None or found.purpose == purpose:
                if len(page) == limit:
                    return page, True
                page.append(found.to_public())
        return page, False

    def delete(self, file_id: str, tenant: str) -> None:
        found = self.get(file_id, tenant)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(redis_keys.file(file_id), redis_keys.file_chunks(file_id))
        pipe.zrem(redis_keys.tenant_files(tenant), f"{file_id}:{found.bytes}")
        pipe.execute()


def _raise_refusal(outcome: str, figure: int, size: int, limits: FileLimits) -> None:
    if outcome == "ok":
        return
    if outcome == "files":
        raise TooManyRequests(
            f"you keep {figure} files, the most allowed; delete some first",
            retry_after_s=CAP_RETRY_AFTER_S, details={"max_files_per_tenant": limits.max_files},
        )
    if outcome == "bytes":
        raise TooManyRequests(
            f"this file's {size} bytes would take your stored files ({figure} bytes) over {limits.max_bytes}; delete some first",
            retry_after_s=CAP_RETRY_AFTER_S, details={"max_file_bytes_per_tenant": limits.max_bytes, "stored": figure, "requested": size},
        )
    raise Unavailable("the upload took too long to store and its staged chunks expired; nothing was kept, retry")
