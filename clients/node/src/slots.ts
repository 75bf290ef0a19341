/**
 * Slot math (docs/protocol.md "Slots and the ring"): a queue lives in slot
 * `hash64(name) % 4096`; a partitioned queue `name` is stored as `name~0 ..
 * name~P-1` and a job goes to partition `hash64(partition key or job id) % P`.
 */
import { murmur3x64 } from "./murmur.js";

export const NUM_SLOTS = 4096;
export const PARTITION_SEP = "~";

const utf8 = new TextEncoder();
const CACHE_MAX = 1 << 15;
const cache = new Map<string, number>();

/** Unsigned 64-bit MurmurHash3 (x64-128, seed 0, first half) of the UTF-8 of `s`. */
export function hash64(s: string): bigint {
  return murmur3x64(utf8.encode(s), 0);
}

/** The slot of a stored queue name, cached (names repeat: one queue per stage). */
export function slotOf(queue: string): number {
  let slot = cache.get(queue);
  if (slot === undefined) {
    slot = Number(hash64(queue) % BigInt(NUM_SLOTS));
    if (cache.size >= CACHE_MAX) cache.clear();
    cache.set(queue, slot);
  }
  return slot;
}

export function partitionName(name: string, i: number): string {
  return `${name}${PARTITION_SEP}${i}`;
}

/** Which of `p` partitions a key goes to. */
export function partitionFor(key: string, p: number): number {
  if (p < 1) throw new RangeError(`a partitioned queue needs at least 1 partition, got ${p}`);
  return Number(hash64(key) % BigInt(p));
}
