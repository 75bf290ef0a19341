// docs/protocol-vectors.json against this client's encoder, decoder and hash,
// and the golden session, frame by frame, against a real standalone broker.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { FrameDecoder, encodeFrame, hash64, partitionFor, slotOf } from "../dist/index.js";
import { REPO, Sandbox } from "./helpers.mjs";

const V = JSON.parse(readFileSync(join(REPO, "docs/protocol-vectors.json"), "utf8"));

function fromJson(v) {
  if (Array.isArray(v)) return v.map(fromJson);
  if (v && typeof v === "object") {
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === "$bin") return Buffer.from(v.$bin, "hex"); // bin decodes to a Buffer view
    if (keys.length === 1 && keys[0] === "$int") return BigInt(v.$int);
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, fromJson(x)]));
  }
  return v;
}

describe("golden vectors", () => {
  test("every request frame encodes to its hex", () => {
    for (const r of V.requests) {
      assert.equal(encodeFrame([r.req_id, r.op, fromJson(r.args)]).toString("hex"), r.hex, `${r.req_id} ${r.op}`);
    }
  });

  test("every request frame decodes back to its value", () => {
    for (const r of V.requests) {
      const frames = new FrameDecoder().feed(Buffer.from(r.hex, "hex"));
      assert.deepEqual(frames, [[r.req_id, r.op, fromJson(r.args)]], `${r.req_id} ${r.op}`);
    }
  });

  test("every reply frame decodes to its value, fed one byte at a time", () => {
    for (const r of V.replies) {
      const bytes = Buffer.from(r.hex, "hex");
      const dec = new FrameDecoder();
      const frames = [];
      for (let i = 0; i < bytes.length; i++) frames.push(...dec.feed(bytes.subarray(i, i + 1)));
      assert.deepEqual(frames, [fromJson(r.value)], r.what);
      assert.equal(encodeFrame(fromJson(r.value)).toString("hex"), r.hex, r.what);
    }
  });

  test("hash64 and slot of every name", () => {
    for (const h of V.hashes) {
      assert.equal(hash64(h.name), BigInt(typeof h.hash64 === "object" ? h.hash64.$int : h.hash64), JSON.stringify(h.name));
      assert.equal(slotOf(h.name), h.slot, JSON.stringify(h.name));
    }
  });

  test("partition of every key", () => {
    for (const p of V.partitions) assert.equal(partitionFor(p.key, p.p), p.partition);
  });

  test("an oversized length prefix is refused before its body arrives", () => {
    const dec = new FrameDecoder(1024);
    assert.throws(() => dec.feed(Buffer.from([0, 0, 8, 0])), { name: "TooLargeError" });
  });
});

describe("golden session against a real broker", () => {
  const sb = new Sandbox();
  let broker;
  before(async () => { broker = await sb.broker("b1"); });
  after(() => sb.cleanup());

  test("every reply matches the vectors' expectations", async () => {
    const [host, port] = [broker.addr.slice(0, broker.addr.lastIndexOf(":")), Number(broker.addr.slice(broker.addr.lastIndexOf(":") + 1))];
    const sock = net.connect({ host, port });
    await new Promise((r, j) => { sock.once("connect", r); sock.once("error", j); });
    const dec = new FrameDecoder();
    const inbox = [];
    let wake = null;
    sock.on("data", (c) => { inbox.push(...dec.feed(c)); wake?.(); });
    try {
      for (const r of V.requests) {
        sock.write(encodeFrame([r.req_id, r.op, fromJson(r.args)]));
        let reply;
        while (!(reply = inbox.find((f) => f[0] === r.req_id && f[1] !== "push"))) await new Promise((w) => (wake = w));
        inbox.splice(inbox.indexOf(reply), 1);
        const [, status, body, epoch] = reply;
        const what = `${r.req_id} ${r.op}`;
        const e = r.expect;
        assert.equal(status, e.status, what);
        if ("body" in e) assert.deepEqual(body, fromJson(e.body), what);
        for (const k of e.keys ?? []) assert.ok(k in body, `${what}: ${k}`);
        if (e.items) {
          assert.equal(body.length, e.items.length, what);
          e.items.forEach((want, i) => {
            if (want && typeof want === "object" && "code" in want) assert.equal(body[i][0], want.code, what);
            else assert.deepEqual(body[i], want, what);
          });
        }
        assert.ok(Number.isInteger(epoch) && epoch >= 1, `${what}: epoch`);
      }
    } finally {
      sock.destroy();
    }
  });
});
