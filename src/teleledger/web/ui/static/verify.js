// "Verify all" on the access-log page: check, in this browser, that every access listed is in the
// organization's transparency log, trusting nothing the page itself says.
//
//   1. GET /ledger/public-key      <name>+<hex key ID>+base64(0x01 || 32-byte Ed25519 key)
//      key ID = SHA-256(name || 0x0A || 0x01 || key)[:4]                       (c2sp.org/signed-note)
//   2. GET /ledger/checkpoint      body = "<origin>\n<size>\n<base64 root>\n", a blank line, then
//      "— <name> base64(key ID (4) || Ed25519 signature (64))" lines; the signature covers the body
//      bytes, final newline included                                      (c2sp.org/tlog-checkpoint)
//   3. per row, GET /ledger/proof/inclusion?hash=<leaf hash>&tree_size=<size>  {leaf_index, audit_path}
//      and fold the audit path into a root (RFC 9162 §2.1.3.2), node = SHA-256(0x01 || left || right);
//      the row is verified when that root equals the checkpoint's.
//
// A 404 for a proof means the entry is not in the tree of that size: normal for an access recorded
// since the last checkpoint (they are signed every second), a failure for an old one.
"use strict";

(function () {
  const TIMEOUT_MS = 10000;
  const PARALLEL = 6;
  // an access older than this that the latest checkpoint does not hold is a failure, not "pending"
  const PENDING_GRACE_MS = 5 * 60 * 1000;
  const HASH_BYTES = 32;
  const utf8 = new TextEncoder();

  class VerifyError extends Error {}

  // ---- bytes -------------------------------------------------------------------------------

  function fromBase64(text, what) {
    let bin;
    try {
      bin = atob(text);
    } catch (e) {
      throw new VerifyError(`${what} is not base64`);
    }
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function toBase64(bytes) {
    let bin = "";
    for (const b of bytes) bin += String.fromCharCode(b);
    return btoa(bin);
  }

  function toHex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function sameBytes(a, b) {
    if (a.length !== b.length) return false;
    let diff = 0;
    for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
    return diff === 0;
  }

  function concat(parts) {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  async function sha256(...parts) {
    return new Uint8Array(await crypto.subtle.digest("SHA-256", concat(parts)));
  }

  // ---- network -----------------------------------------------------------------------------

  async function get(url) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
    try {
      return await fetch(url, { signal: abort.signal, cache: "no-store", credentials: "omit" });
    } catch (e) {
      if (e.name === "AbortError") throw new VerifyError(`the log did not answer within ${TIMEOUT_MS / 1000} s`);
      throw new VerifyError("could not reach the log (network error)");
    } finally {
      clearTimeout(timer);
    }
  }

  async function problem(response) {
    // errors come as FHIR OperationOutcome; say what the server said, briefly
    try {
      const body = await response.json();
      const issue = (body.issue || [])[0] || {};
      return (issue.diagnostics || issue.details?.text || "").slice(0, 200) || `HTTP ${response.status}`;
    } catch (e) {
      return `HTTP ${response.status}`;
    }
  }

  // ---- the log's key and checkpoint ----------------------------------------------------------

  async function parsePublicKey(text) {
    const vkey = text.trim();
    const a = vkey.indexOf("+");
    const b = vkey.indexOf("+", a + 1); // key names contain no "+", base64 may
    if (a <= 0 || b < 0) throw new VerifyError("the log's public key is malformed");
    const name = vkey.slice(0, a);
    const keyId = vkey.slice(a + 1, b).toLowerCase();
    const key = fromBase64(vkey.slice(b + 1), "the log's public key");
    if (!/^[0-9a-f]{8}$/.test(keyId)) throw new VerifyError(`the log's key ID ${keyId} is not 8 hex digits`);
    if (key.length !== 33 || key[0] !== 0x01) {
      throw new VerifyError(`the log's key is not an Ed25519 note key (expected 0x01 and 32 bytes, found ${key.length} bytes)`);
    }
    const computed = toHex((await sha256(utf8.encode(name), [0x0a], key)).slice(0, 4));
    if (computed !== keyId) throw new VerifyError(`the log's key ID is ${keyId} but its key hashes to ${computed}`);
    return { vkey, name, keyId, publicKey: key.slice(1) };
  }

  function parseCheckpoint(note) {
    const cut = note.lastIndexOf("\n\n");
    if (cut < 0) throw new VerifyError("the checkpoint has no signature block");
    const body = note.slice(0, cut + 1);
    const lines = body.split("\n");
    if (lines.length < 4) throw new VerifyError("the checkpoint body has fewer than three lines");
    const [origin, sizeText, rootText] = lines;
    if (!/^(0|[1-9][0-9]{0,15})$/.test(sizeText) || !Number.isSafeInteger(Number(sizeText))) {
      throw new VerifyError(`the checkpoint's tree size ${JSON.stringify(sizeText.slice(0, 30))} is not a decimal number`);
    }
    const root = fromBase64(rootText, "the checkpoint's root hash");
    if (root.length !== HASH_BYTES) throw new VerifyError(`the checkpoint's root is ${root.length} bytes, expected 32`);
    const signatures = [];
    for (const line of note.slice(cut + 2).split("\n")) {
      if (!line.startsWith("\u2014 ")) continue;
      const space = line.lastIndexOf(" ");
      try {
        signatures.push({ name: line.slice(2, space), payload: fromBase64(line.slice(space + 1), "a signature") });
      } catch (e) {
        // a line we cannot read is a line from a signer we do not know: ignored, as the spec says
      }
    }
    return { origin, size: Number(sizeText), root, body, signatures };
  }

  // "verified", or "unsupported" when this browser has no Ed25519 in WebCrypto; throws when it is wrong
  async function checkSignature(checkpoint, key) {
    const sig = checkpoint.signatures.find((s) => s.name === key.name && s.payload.length >= 4 &&
                                                   toHex(s.payload.slice(0, 4)) === key.keyId);
    if (!sig) throw new VerifyError(`the checkpoint is not signed by the log's key ${key.name}+${key.keyId}`);
    if (sig.payload.length !== 4 + 64) {
      throw new VerifyError(`the log's signature is ${sig.payload.length - 4} bytes, expected 64`);
    }
    let cryptoKey;
    try {
      cryptoKey = await crypto.subtle.importKey("raw", key.publicKey, { name: "Ed25519" }, false, ["verify"]);
    } catch (e) {
      return "unsupported";
    }
    const ok = await crypto.subtle.verify({ name: "Ed25519" }, cryptoKey, sig.payload.slice(4), utf8.encode(checkpoint.body));
    if (!ok) throw new VerifyError("the checkpoint's signature does not verify: do not trust this checkpoint");
    return "verified";
  }

  // ---- inclusion (RFC 9162 §2.1.3.2) -----------------------------------------------------------

  async function rootFromAuditPath(leafHash, index, size, path) {
    if (index >= size) throw new VerifyError(`leaf index ${index} is beyond the tree size ${size}`);
    let fn = index;
    let sn = size - 1;
    let r = leafHash;
    for (const p of path) {
      if (sn === 0) throw new VerifyError("the audit path is too long");
      if (fn % 2 === 1 || fn === sn) {
        r = await sha256([0x01], p, r);
        while (fn !== 0 && fn % 2 === 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      } else {
        r = await sha256([0x01], r, p);
      }
      fn = Math.floor(fn / 2);
      sn = Math.floor(sn / 2);
    }
    if (sn !== 0) throw new VerifyError("the audit path is too short");
    return r;
  }

  async function checkRow(row, checkpoint) {
    const leafText = row.dataset.leafHash || "";
    const leaf = fromBase64(leafText, "the row's leaf hash");
    if (leaf.length !== HASH_BYTES) throw new VerifyError(`the row's leaf hash is ${leaf.length} bytes, expected 32`);
    const url = `/ledger/proof/inclusion?hash=${encodeURIComponent(leafText)}&tree_size=${checkpoint.size}`;
    const response = await get(url);
    if (response.status === 404) {
      const age = Date.now() - Date.parse(row.dataset.recorded || "");
      if (!(age > PENDING_GRACE_MS)) return { state: "pending" };
      throw new VerifyError(`not in the log: recorded ${Math.round(age / 60000)} min ago, ` +
                            `yet not in the checkpoint of size ${checkpoint.size}`);
    }
    if (!response.ok) throw new VerifyError(`the log refused the proof: ${await problem(response)}`);
    let proof;
    try {
      proof = await response.json();
    } catch (e) {
      throw new VerifyError("the proof is not JSON");
    }
    if (!Number.isSafeInteger(proof.leaf_index) || proof.leaf_index < 0 || !Array.isArray(proof.audit_path)) {
      throw new VerifyError("the proof is malformed (leaf_index, audit_path)");
    }
    const path = proof.audit_path.map((h, i) => {
      const bytes = fromBase64(String(h), `audit path element ${i}`);
      if (bytes.length !== HASH_BYTES) {
        throw new VerifyError(`audit path element ${i} is ${bytes.length} bytes, expected 32`);
      }
      return bytes;
    });
    const computed = await rootFromAuditPath(leaf, proof.leaf_index, checkpoint.size, path);
    if (!sameBytes(computed, checkpoint.root)) {
      throw new VerifyError(`root mismatch: the proof leads to ${toBase64(computed)}, ` +
                            `the checkpoint says ${toBase64(checkpoint.root)}`);
    }
    return { state: "verified", index: proof.leaf_index };
  }

  // ---- the page ------------------------------------------------------------------------------

  const STATUS = {
    checking: "checking…",
    verified: "✓ verified",
    failed: "✗ failed",
    pending: "pending — will be in the next checkpoint (≤ 1 s)",
    unchecked: "not checked",
  };

  function mark(row, state, detail) {
    const cell = row.querySelector("td.proof");
    cell.dataset.state = state;
    row.dataset.proof = state;
    const status = document.createElement("span");
    status.className = "proof-status";
    status.textContent = STATUS[state];
    const parts = [status];
    if (detail) {
      const more = document.createElement("span");
      more.className = "proof-detail";
      more.textContent = detail;
      parts.push(more);
    }
    cell.replaceChildren(...parts);
  }

  async function eachLimited(items, limit, fn) {
    let next = 0;
    const worker = async () => {
      while (next < items.length) await fn(items[next++]);
    };
    await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  }

  function plural(n, one, many) {
    return `${n} ${n === 1 ? one : many}`;
  }

  function showCheckpoint(checkpoint, key, signature) {
    document.getElementById("checkpoint-info").hidden = false;
    document.getElementById("checkpoint-text").textContent =
      `${checkpoint.origin}, size ${checkpoint.size}, root ${toBase64(checkpoint.root)}`;
    document.getElementById("signature-text").textContent = signature === "verified"
      ? "✓ Ed25519 signature verified in this browser"
      : "signature not checked in this browser (it has no Ed25519 in WebCrypto); the proofs are still checked";
    document.getElementById("log-key").textContent = key.vkey;
  }

  async function verifyAll(button, summary) {
    const rows = Array.from(document.querySelectorAll("tr.access-row"));
    const table = document.getElementById("access-table");
    // aria-disabled, not disabled: a disabled button would drop the keyboard focus
    button.setAttribute("aria-disabled", "true");
    if (table) table.setAttribute("aria-busy", "true");
    summary.textContent = "Checking the proofs…";
    try {
      if (!window.crypto || !crypto.subtle) {
        throw new VerifyError("this browser cannot check proofs here: the page needs a secure (https) connection");
      }
      rows.forEach((row) => mark(row, "checking"));
      const [keyResponse, noteResponse] = await Promise.all([get("/ledger/public-key"), get("/ledger/checkpoint")]);
      if (noteResponse.status === 404) {
        rows.forEach((row) => mark(row, "pending", "the log has not signed a checkpoint yet"));
        summary.textContent = `0 of ${rows.length} accesses verified: the log has no checkpoint yet. Press “Verify all” again in a moment.`;
        return;
      }
      if (!keyResponse.ok) throw new VerifyError(`could not get the log's key: ${await problem(keyResponse)}`);
      if (!noteResponse.ok) throw new VerifyError(`could not get the checkpoint: ${await problem(noteResponse)}`);
      const key = await parsePublicKey(await keyResponse.text());
      const checkpoint = parseCheckpoint(await noteResponse.text());
      const signature = await checkSignature(checkpoint, key);
      showCheckpoint(checkpoint, key, signature);

      const counts = { verified: 0, failed: 0, pending: 0 };
      await eachLimited(rows, PARALLEL, async (row) => {
        try {
          const result = await checkRow(row, checkpoint);
          counts[result.state] += 1;
          mark(row, result.state, result.state === "verified" ? `leaf index ${result.index}, tree size ${checkpoint.size}` : "");
        } catch (e) {
          counts.failed += 1;
          mark(row, "failed", e instanceof VerifyError ? e.message : `unexpected error: ${e.message}`);
        }
      });
      let text = `${counts.verified} of ${plural(rows.length, "access", "accesses")} verified against checkpoint size ${checkpoint.size}.`;
      if (counts.failed) text += ` ${counts.failed} failed: see the Proof column.`;
      if (counts.pending) text += ` ${counts.pending} pending: newer than the checkpoint; press “Verify all” again in a second.`;
      if (signature !== "verified") text += " Checkpoint signature not checked in this browser.";
      summary.textContent = text;
    } catch (e) {
      const reason = e instanceof VerifyError ? e.message : `unexpected error: ${e.message}`;
      rows.forEach((row) => mark(row, "failed", reason));
      summary.textContent = `0 of ${plural(rows.length, "access", "accesses")} verified: ${reason}.`;
    } finally {
      button.removeAttribute("aria-disabled");
      if (table) table.removeAttribute("aria-busy");
    }
  }

  function localTimes() {
    const format = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
    for (const el of document.querySelectorAll("time[datetime]")) {
      const when = new Date(el.getAttribute("datetime"));
      if (Number.isNaN(when.getTime())) continue;
      el.title = el.textContent; // the UTC time the server wrote
      el.textContent = format.format(when);
    }
  }

  function start() {
    localTimes();
    const button = document.getElementById("verify-all");
    const summary = document.getElementById("verify-summary");
    if (!button || !summary) return;
    if (!document.querySelector("tr.access-row")) {
      summary.textContent = "There is nothing to verify yet.";
      return;
    }
    button.hidden = false;
    button.addEventListener("click", () => {
      if (button.getAttribute("aria-disabled") !== "true") verifyAll(button, summary);
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
