"""JA4 TLS client fingerprint (FoxIO's JA4 specification, technical_details/JA4.md).

ja4 = a_b_c where a = 't' + version + ('d' SNI | 'i' none) + cipher count + extension count +
ALPN first/last characters; b = sha256 of the sorted cipher list, truncated to 12 hex digits;
c = sha256 of the sorted extension list without SNI and ALPN, then '_' and the signature
algorithms in the order sent. GREASE values (RFC 8701) are ignored everywhere.

Fingerprints repeat across connections from the same client software, so results are memoised
on the raw inputs (bounded): the per-connection cost is then one dictionary lookup.
"""

from __future__ import annotations

import hashlib
import struct

_VERSIONS = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}
_EMPTY_HASH = "000000000000"
_CACHE_MAX = 4096
_cache: dict[tuple[object, ...], str] = {}


def _grease(value: int) -> bool:
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def _is_alnum(byte: int) -> bool:
    return 0x30 <= byte <= 0x39 or 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A


def alpn_chars(first: bytes | None) -> str:
    """The two ALPN characters of JA4_a."""
    if not first:
        return "00"
    if _is_alnum(first[0]) and _is_alnum(first[-1]):
        return chr(first[0]) + chr(first[-1])
    text = first.hex()
    return text[0] + text[-1]


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12]


def ja4_fingerprint(
    legacy_version: int,
    supported_versions: tuple[int, ...],
    has_sni: bool,
    cipher_bytes: bytes,
    extensions: tuple[int, ...],
    sigalg_bytes: bytes,
    first_alpn: bytes | None,
    transport: str = "t",
) -> str:
    """JA4 from the raw ClientHello fields. `sigalg_bytes` is the signature_algorithms
    extension body (with its length prefix) or b''."""
    key = (
        legacy_version,
        supported_versions,
        has_sni,
        cipher_bytes,
        extensions,
        sigalg_bytes,
        first_alpn,
        transport,
    )
    hit = _cache.get(key)
    if hit is not None:
        return hit
    versions = [v for v in supported_versions if not _grease(v)]
    version = _VERSIONS.get(max(versions) if versions else legacy_version, "00")
    ciphers = [
        c for c in struct.unpack(f">{len(cipher_bytes) // 2}H", cipher_bytes) if not _grease(c)
    ]
    exts = [e for e in extensions if not _grease(e)]
    a = (
        f"{transport}{version}{'d' if has_sni else 'i'}"
        f"{min(len(ciphers), 99):02d}{min(len(exts), 99):02d}{alpn_chars(first_alpn)}"
    )
    b = _hash12(",".join(sorted(f"{c:04x}" for c in ciphers))) if ciphers else _EMPTY_HASH
    ext_list = sorted(f"{e:04x}" for e in exts if e not in (0x0000, 0x0010))
    if ext_list:
        c_text = ",".join(ext_list)
        if len(sigalg_bytes) >= 2:
            sigs = struct.unpack_from(f">{(len(sigalg_bytes) - 2) // 2}H", sigalg_bytes, 2)
            sig_list = [f"{s:04x}" for s in sigs if not _grease(s)]
            if sig_list:
                c_text += "_" + ",".join(sig_list)
        c = _hash12(c_text)
    else:
        c = _EMPTY_HASH
    result = f"{a}_{b}_{c}"
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = result
    return result
