// blindfold service worker: serves sealed paths from the blind edge, verified and decrypted
// in the browser. The origin agent serves this file with CONFIG filled in (the manifest URL,
// the edge, the site's Ed25519 manifest key). Format and protocol: docs/blind.md.
//
// For each GET of a path listed in the signed manifest: fetch the sealed blob from the edge,
// decrypt its RFC 8188 aes128gcm records with WebCrypto as they arrive (each record is
// authenticated; the last one is marked, so truncation and reordering are detected), check
// sizes and, for files up to BUFFER_LIMIT, the SHA-256 of the blob and of the plaintext
// before a byte is released. On any failure the origin serves the file instead, from its
// plaintext prefix (a failure in the middle of a streamed file: the rest, with a Range
// request) and the failure is reported.
//
// A path the public manifest does not list may be private: the private manifest (the keys of
// the files only some visitors may see) is asked for with the visitor's credentials, and the
// origin serves it only when the site's application admits the visitor. Admitted: its files
// come from the edge like the others. Refused (or no private content): the request goes to
// the origin as it is, which asks the application again and answers its 401/403 for a
// private file; the browser never gets a private key or plaintext it was refused.
'use strict';

const CONFIG = /*BLINDFOLD_CONFIG*/ {};
const BUFFER_LIMIT = 8 * 1024 * 1024;
const MANIFEST_TTL_MS = 60 * 1000;
const REFUSED_TTL_MS = 5 * 1000;  // a refusal is asked again this soon (the visitor may log in)
const EDGE_IDLE_MS = 15 * 1000;  // an edge that sends nothing this long has failed
const EDGE_TOTAL_MS = 120 * 1000;  // for a file checked whole before release
const enc = new TextEncoder();

self.addEventListener('install', (event) => event.waitUntil(self.skipWaiting()));
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('fetch', (event) => {
  const request = event.request;
  if (request.method !== 'GET') return;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin || url.pathname === CONFIG.manifest
      || url.pathname === CONFIG.privateManifest) return;
  if (request.headers.has('range')) return;  // partial requests go to the origin as they are
  event.respondWith(handle(request, url));
});

// `promise`, or a rejection (and the fetch aborted) when it takes longer than `ms`.
function deadline(promise, ms, abort) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => {
      abort.abort();
      reject(new Error(`edge: nothing within ${ms} ms`));
    }, ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

function b64u(text) {
  const s = atob(text.replace(/-/g, '+').replace(/_/g, '/') + '==='.slice((text.length + 3) % 4));
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, '0')).join('');
}

let manifestState = null;  // {files, expiresAt, fetchedAt}
let privateState = null;  // {files (null: none for this visitor), expiresAt, fetchedAt, ttl}
let privateLoading = null;  // the one request in flight: a page's many requests share it

async function loadManifest() {
  const now = Date.now();
  if (manifestState && now - manifestState.fetchedAt < MANIFEST_TTL_MS
      && now / 1000 < manifestState.expiresAt) {
    return manifestState.files;
  }
  const response = await fetch(CONFIG.manifest, {cache: 'no-store', credentials: 'same-origin'});
  if (!response.ok) throw new Error(`manifest: HTTP ${response.status}`);
  const body = await verified(await response.json(), now, 'manifest');
  manifestState = {files: body.files, expiresAt: body.expires_at, fetchedAt: now};
  return body.files;
}

// The private manifest's files for this visitor, or null: the site has none, or its
// application refused the visitor (401, 403). Verified exactly like the public one.
function loadPrivate() {
  if (!CONFIG.privateManifest) return Promise.resolve(null);
  const now = Date.now();
  if (privateState && now - privateState.fetchedAt < privateState.ttl
      && now / 1000 < privateState.expiresAt) {
    return Promise.resolve(privateState.files);
  }
  if (!privateLoading) {
    privateLoading = fetchPrivate(now).finally(() => { privateLoading = null; });
  }
  return privateLoading;
}

async function fetchPrivate(now) {
  const response = await fetch(CONFIG.privateManifest, {cache: 'no-store',
                                                        credentials: 'include'});
  if (response.status === 401 || response.status === 403 || response.status === 404) {
    response.body?.cancel().catch(() => {});
    const ttl = response.status === 404 ? MANIFEST_TTL_MS : REFUSED_TTL_MS;
    privateState = {files: null, expiresAt: Infinity, fetchedAt: now, ttl};
    return null;
  }
  if (!response.ok) throw new Error(`private manifest: HTTP ${response.status}`);
  const body = await verified(await response.json(), now, 'private manifest');
  privateState = {files: body.files, expiresAt: body.expires_at, fetchedAt: now,
                  ttl: MANIFEST_TTL_MS};
  return body.files;
}

// The payload of a signed manifest document (docs/blind.md), or an error naming what failed.
async function verified(doc, now, what) {
  if (doc.format !== 'blindfold-manifest/1' || doc.alg !== 'ed25519') {
    throw new Error(`${what}: unknown format`);
  }
  if (doc.key_id !== CONFIG.keyId) throw new Error(`${what}: signed by key ${doc.key_id}`);
  const key = await crypto.subtle.importKey('raw', b64u(CONFIG.publicKey), {name: 'Ed25519'},
                                            false, ['verify']);
  const ok = await crypto.subtle.verify({name: 'Ed25519'}, key, b64u(doc.signature),
                                        enc.encode(doc.payload));
  if (!ok) throw new Error(`${what}: bad signature`);
  const body = JSON.parse(doc.payload);
  if (body.format !== 'blindfold-manifest/1') throw new Error(`${what}: payload format`);
  if (now / 1000 >= body.expires_at) throw new Error(`${what}: expired`);
  if (now / 1000 < body.issued_at - 300) throw new Error(`${what}: issued in the future`);
  return body;
}

async function handle(request, url) {
  let files;
  try {
    files = await loadManifest();
  } catch (err) {
    report(url.pathname, null, String(err));
    return fetch(request);
  }
  let name;
  try {
    name = decodeURIComponent(url.pathname);
  } catch (err) {  // a malformed escape: not a sealed path
    return fetch(request);
  }
  let entry = Object.hasOwn(files, name) ? files[name] : null;
  if (!entry) {
    let mine;
    try {
      mine = await loadPrivate();
    } catch (err) {
      report(url.pathname, null, String(err));
      return fetch(request);  // the origin decides (it asks the application again)
    }
    entry = mine && Object.hasOwn(mine, name) ? mine[name] : null;
  }
  if (!entry) return fetch(request);
  try {
    return await fromEdge(entry, request);
  } catch (err) {
    report(url.pathname, entry.id, String(err));
    return fromOrigin(request, entry);
  }
}

function headersFor(entry) {
  return {'content-type': entry.type, 'content-length': String(entry.size),
          'x-blindfold-source': 'edge'};
}

// The origin serves the plaintext of every sealed file under its own prefix (after its WAF,
// whatever the application does with the file's own path); without a source_dir (no prefix)
// the application serves it at its own URL.
function plainUrl(request) {
  if (!CONFIG.plain) return request.url;
  return CONFIG.plain + new URL(request.url).pathname.slice(1);
}

async function fromOrigin(request, entry) {
  const response = await fetch(plainUrl(request), {cache: 'no-store',
                                                   credentials: 'same-origin'});
  const headers = new Headers(response.headers);
  headers.set('x-blindfold-source', 'origin');
  return new Response(response.body, {status: response.status, headers});
}

// RFC 8188 §2: aes128gcm records, opened one by one.
class Opener {
  constructor(key, maxRs) {
    this.key = key;
    this.maxRs = maxRs;
    this.buf = new Uint8Array(0);
    this.aead = null;
    this.nonce = null;
    this.rs = 0;
    this.seq = 0;
    this.done = false;
  }

  push(chunk) {
    const joined = new Uint8Array(this.buf.length + chunk.length);
    joined.set(this.buf);
    joined.set(chunk, this.buf.length);
    this.buf = joined;
  }

  async header() {
    if (this.aead) return true;
    if (this.buf.length < 21) return false;
    const view = new DataView(this.buf.buffer, this.buf.byteOffset);
    const rs = view.getUint32(16);
    const idlen = this.buf[20];
    if (this.buf.length < 21 + idlen) return false;
    if (rs < 18 || rs > this.maxRs) throw new Error(`record size ${rs} not allowed`);
    const salt = this.buf.slice(0, 16);
    const ikm = await crypto.subtle.importKey('raw', this.key, 'HKDF', false, ['deriveBits']);
    const derive = (info, bits) => crypto.subtle.deriveBits(
      {name: 'HKDF', hash: 'SHA-256', salt, info: enc.encode(info)}, ikm, bits);
    const cek = await derive('Content-Encoding: aes128gcm\0', 128);
    this.nonce = new Uint8Array(await derive('Content-Encoding: nonce\0', 96));
    this.aead = await crypto.subtle.importKey('raw', cek, 'AES-GCM', false, ['decrypt']);
    this.rs = rs;
    this.buf = this.buf.slice(21 + idlen);
    return true;
  }

  // Records that are complete (a byte beyond them has arrived, or `final`). They are
  // decrypted concurrently (WebCrypto runs off the worker's thread), then checked in order.
  async records(final) {
    if (!(await this.header())) {
      if (final) throw new Error('truncated header');
      return [];
    }
    const jobs = [];
    let at = 0;
    while (this.buf.length - at > this.rs || (final && this.buf.length - at > 0)) {
      const n = Math.min(this.rs, this.buf.length - at);
      const record = this.buf.subarray(at, at + n);
      at += n;
      jobs.push([this.seq++, record, final && at === this.buf.length]);
    }
    this.buf = this.buf.slice(at);
    const plains = await Promise.all(jobs.map(([seq, record]) => this.decrypt(seq, record)));
    const out = [];
    for (let i = 0; i < plains.length; i++) out.push(this.check(plains[i], jobs[i][2]));
    if (final && !this.done) throw new Error('truncated: no last record');
    return out;
  }

  async decrypt(seq, record) {
    const iv = this.nonce.slice();
    for (let i = 11, s = seq; i >= 6 && s > 0; i--) {  // NONCE XOR SEQ (RFC 8188 §2.3)
      iv[i] ^= s & 0xff;
      s = Math.floor(s / 256);
    }
    try {
      return new Uint8Array(await crypto.subtle.decrypt({name: 'AES-GCM', iv}, this.aead, record));
    } catch (err) {
      throw new Error(`record ${seq} does not authenticate`);
    }
  }

  check(plain, lastInStream) {
    if (this.done) throw new Error('data after the last record');
    let end = plain.length;
    while (end > 0 && plain[end - 1] === 0) end--;
    if (end === 0) throw new Error('record without a delimiter');
    const delim = plain[end - 1];
    if (delim === 2) this.done = true;
    else if (delim !== 1 || lastInStream) throw new Error('bad delimiter or truncated');
    return plain.subarray(0, end - 1);
  }
}

// The body of an edge response, but never more than `limit` bytes: a hostile edge may send
// without end. Reading stops (and the fetch is aborted) at limit + 1 bytes, as the streaming
// path does; each read within EDGE_IDLE_MS, the whole within EDGE_TOTAL_MS.
async function readAtMost(response, limit, abort) {
  const declared = Number(response.headers.get('content-length'));
  if (declared > limit) {
    abort.abort();
    throw new Error('blob larger than the manifest says');
  }
  const reader = response.body.getReader();
  const until = Date.now() + EDGE_TOTAL_MS;
  const chunks = [];
  let total = 0;
  while (true) {
    const wait = Math.max(1, Math.min(EDGE_IDLE_MS, until - Date.now()));
    const {value, done} = await deadline(reader.read(), wait, abort);
    if (done) break;
    total += value.length;
    if (total > limit) {
      reader.cancel().catch(() => {});
      abort.abort();
      throw new Error('blob larger than the manifest says');
    }
    chunks.push(value);
  }
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

async function fromEdge(entry, request) {
  const abort = new AbortController();
  const response = await deadline(fetch(`${CONFIG.edge}/b/${entry.id}`,
                                        {mode: 'cors', credentials: 'omit',
                                         signal: abort.signal}), EDGE_IDLE_MS, abort);
  if (!response.ok) throw new Error(`edge: HTTP ${response.status}`);
  const key = b64u(entry.key);
  if (entry.sealed_size <= BUFFER_LIMIT) {
    // Small: check everything before the page sees a byte.
    const blob = await readAtMost(response, entry.sealed_size, abort);
    if (blob.length !== entry.sealed_size) throw new Error('blob size differs from the manifest');
    if (hex(await crypto.subtle.digest('SHA-256', blob)) !== entry.blob_sha256) {
      throw new Error('blob digest differs from the manifest');
    }
    const opener = new Opener(key, entry.rs);
    opener.push(blob);
    const parts = await opener.records(true);
    const plain = new Uint8Array(entry.size);
    let at = 0;
    for (const p of parts) {
      if (at + p.length > entry.size) throw new Error('more plaintext than the manifest says');
      plain.set(p, at);
      at += p.length;
    }
    if (at !== entry.size) throw new Error('plaintext size differs from the manifest');
    if (hex(await crypto.subtle.digest('SHA-256', plain)) !== entry.sha256) {
      throw new Error('plaintext digest differs from the manifest');
    }
    return new Response(plain, {status: 200, headers: headersFor(entry)});
  }
  // Large: stream record by record. The first record is opened before answering, so a blob
  // that is bad from the start still falls back whole.
  const reader = response.body.getReader();
  const opener = new Opener(key, entry.rs);
  let delivered = 0;
  let received = 0;
  let ended = false;
  const next = async () => {
    while (true) {
      if (ended) return null;
      const {value, done} = await deadline(reader.read(), EDGE_IDLE_MS, abort);
      if (done) {
        ended = true;
        if (received !== entry.sealed_size) throw new Error('blob size differs from the manifest');
        return opener.records(true);
      }
      received += value.length;
      if (received > entry.sealed_size) throw new Error('blob larger than the manifest says');
      opener.push(value);
      const parts = await opener.records(false);
      if (parts.length) return parts;
    }
  };
  const first = await next();
  const check = (parts) => {
    for (const p of parts) delivered += p.length;
    if (delivered > entry.size) throw new Error('more plaintext than the manifest says');
    return parts;
  };
  check(first || []);
  const stream = new ReadableStream({
    start(controller) {
      for (const p of first || []) controller.enqueue(p);
    },
    async pull(controller) {
      try {
        const parts = await next();
        if (parts === null) {
          if (delivered !== entry.size) throw new Error('plaintext size differs from the manifest');
          controller.close();
          return;
        }
        for (const p of check(parts)) controller.enqueue(p);
      } catch (err) {
        reader.cancel().catch(() => {});
        report(new URL(request.url).pathname, entry.id, `${err} (after ${delivered} bytes)`);
        // The bytes released so far were authenticated: the origin sends the rest.
        try {
          await rest(request, entry, delivered, controller);
        } catch (err2) {
          controller.error(err2);
        }
      }
    },
  });
  return new Response(stream, {status: 200, headers: headersFor(entry)});
}

async function rest(request, entry, from, controller) {
  if (from === entry.size) {  // every byte was released, authenticated and in order
    controller.close();
    return;
  }
  // If-Range with the manifest's digest: the origin answers 206 only for this very version.
  const response = await fetch(plainUrl(request), {
    cache: 'no-store', credentials: 'same-origin',
    headers: {'range': `bytes=${from}-`, 'if-range': `"${entry.sha256}"`}});
  if (response.status !== 206) throw new Error(`origin range: HTTP ${response.status}`);
  const reader = response.body.getReader();
  let total = from;
  while (true) {
    const {value, done} = await reader.read();
    if (done) break;
    total += value.length;
    if (total > entry.size) throw new Error('origin sent too much');
    controller.enqueue(value);
  }
  if (total !== entry.size) throw new Error('origin sent too little');
  controller.close();
}

// A failure goes to the site (logged there) and, for a blob, to the edge too, which checks
// its copy against the site's signed blob index and drops it when bad (a POST without a body
// or custom headers: no preflight).
function report(path, id, error) {
  if (id) {
    fetch(`${CONFIG.edge}/r/${id}`, {method: 'POST', mode: 'cors', credentials: 'omit',
                                     keepalive: true}).catch(() => {});
  }
  if (!CONFIG.report) return;
  fetch(CONFIG.report, {method: 'POST', credentials: 'same-origin', keepalive: true,
                        headers: {'content-type': 'application/json'},
                        body: JSON.stringify({path, id, error: error.slice(0, 500)})})
    .catch(() => {});
}
