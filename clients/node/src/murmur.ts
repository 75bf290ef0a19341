/**
 * MurmurHash3 x64-128 (Austin Appleby's reference `MurmurHash3_x64_128`),
 * first 64-bit half, unsigned: shardq's one hash (docs/protocol.md "Slots").
 * Python's side is `mmh3.hash64(key.encode(), 0, True, False)[0] & (2**64-1)`;
 * the golden vectors in docs/protocol-vectors.json pin both.
 *
 * BigInt arithmetic keeps it short and exact; the client calls it once per
 * queue name (slots are cached), so its speed does not matter.
 */
const M = (1n << 64n) - 1n;
const C1 = 0x87c37b91114253d5n;
const C2 = 0x4cf5ad432745937fn;

const rotl = (x: bigint, r: bigint): bigint => ((x << r) | (x >> (64n - r))) & M;

function fmix(k: bigint): bigint {
  k ^= k >> 33n;
  k = (k * 0xff51afd7ed558ccdn) & M;
  k ^= k >> 33n;
  k = (k * 0xc4ceb9fe1a85ec53n) & M;
  return k ^ (k >> 33n);
}

/** The unsigned first half of MurmurHash3 x64-128 of `bytes` with `seed`. */
export function murmur3x64(bytes: Uint8Array, seed = 0): bigint {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const len = bytes.length;
  const blocks = len - (len % 16);
  let h1 = BigInt(seed) & M;
  let h2 = h1;
  for (let i = 0; i < blocks; i += 16) {
    let k1 = view.getBigUint64(i, true);
    let k2 = view.getBigUint64(i + 8, true);
    k1 = (rotl((k1 * C1) & M, 31n) * C2) & M;
    h1 ^= k1;
    h1 = (((rotl(h1, 27n) + h2) & M) * 5n + 0x52dce729n) & M;
    k2 = (rotl((k2 * C2) & M, 33n) * C1) & M;
    h2 ^= k2;
    h2 = (((rotl(h2, 31n) + h1) & M) * 5n + 0x38495ab5n) & M;
  }
  let k1 = 0n;
  let k2 = 0n;
  for (let i = len - 1; i >= blocks; i--) {
    const b = BigInt(bytes[i]!);
    const at = i - blocks;
    if (at >= 8) k2 |= b << BigInt((at - 8) * 8);
    else k1 |= b << BigInt(at * 8);
  }
  if (len - blocks > 8) {
    k2 = (rotl((k2 * C2) & M, 33n) * C1) & M;
    h2 ^= k2;
  }
  if (len - blocks > 0) {
    k1 = (rotl((k1 * C1) & M, 31n) * C2) & M;
    h1 ^= k1;
  }
  const n = BigInt(len);
  h1 ^= n;
  h2 ^= n;
  h1 = (h1 + h2) & M;
  h2 = (h2 + h1) & M;
  h1 = fmix(h1);
  h2 = fmix(h2);
  h1 = (h1 + h2) & M;
  return h1;
}
