/**
 * Time-ordered job ids (UUIDv7, RFC 9562), made before the first send so a
 * resend after a timeout, TRYAGAIN or MOVED is idempotent (docs/protocol.md
 * "Idempotent ids"). 48-bit Unix ms | version 7 | 12-bit counter seeded
 * randomly each millisecond | variant | 62 random bits: ids from one process
 * sort in creation order, even within a millisecond.
 */
import { randomFillSync } from "node:crypto";

let lastMs = 0;
let counter = 0;
let prefix = "";
const pool = Buffer.alloc(8 * 1024);
let poolPos = pool.length;

function setMs(ms: number): void {
  lastMs = ms;
  counter = randomBits16() & 0x7ff;
  const hex = ms.toString(16).padStart(12, "0");
  prefix = `${hex.slice(0, 8)}-${hex.slice(8, 12)}-7`;
}

function randomBits16(): number {
  if (poolPos + 2 > pool.length) {
    randomFillSync(pool);
    poolPos = 0;
  }
  const v = pool.readUInt16BE(poolPos);
  poolPos += 2;
  return v;
}

function randomHex8(): string {
  if (poolPos + 8 > pool.length) {
    randomFillSync(pool);
    poolPos = 0;
  }
  const s = pool.toString("hex", poolPos, poolPos + 8);
  poolPos += 8;
  return s;
}

/** A new UUIDv7 as the canonical 36-character lowercase string. */
export function uuid7(): string {
  const ms = Date.now();
  if (ms > lastMs) {
    setMs(ms);
  } else if (++counter > 0xfff) {
    setMs(lastMs + 1);
  }
  const r = randomHex8();
  const variant = ((parseInt(r[0]!, 16) & 0x3) | 0x8).toString(16);
  return `${prefix}${counter.toString(16).padStart(3, "0")}-${variant}${r.slice(1, 4)}-${r.slice(4, 16)}`;
}
