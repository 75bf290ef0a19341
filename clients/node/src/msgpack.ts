/**
 * msgpack as the shardq wire writes it (docs/protocol.md "Encoding").
 *
 * `@msgpack/msgpack` does the work. Two of its choices differ from what the
 * Python side (msgpack-python) writes and expects, so they are adjusted here:
 *
 * - integers: lock tokens are 62-bit, past `Number.MAX_SAFE_INTEGER`, so
 *   int64/uint64 must round-trip as `bigint` (`useBigInt64`). With that
 *   option the library would encode a safe integer of 2^32 or more as a
 *   float64, which the broker refuses where it wants an int (timestamps,
 *   deadlines); and it would decode every uint64, even a millisecond
 *   timestamp, as a bigint. The encoder below writes every integer in its
 *   smallest msgpack int form (as msgpack-python does, so frames are byte
 *   for byte those of the golden vectors) and the decoder returns a
 *   `number` whenever the value is a safe integer, a `bigint` otherwise.
 * - binary: `bin` decodes to a `Uint8Array` view (job data and results are
 *   opaque msgpack bytes that the broker never decodes).
 */
import { Decoder, Encoder } from "@msgpack/msgpack";

type Hooks = Record<string, (...args: unknown[]) => unknown>;

const U32 = 0x1_0000_0000;
const I32 = -0x8000_0000;
const MAX = BigInt(Number.MAX_SAFE_INTEGER);
const MIN = BigInt(Number.MIN_SAFE_INTEGER);

// The overrides reach into the library's private methods; the version is
// pinned in package-lock.json and test/codec.test.mjs checks every integer
// width against the golden vectors, so a change there fails a test.
const encoderProto = Encoder.prototype as unknown as Hooks;
const baseEncodeNumber = encoderProto["encodeNumber"];
const baseEncodeBigInt = encoderProto["encodeBigInt64"];
const decoderProto = Decoder.prototype as unknown as Hooks;
const baseReadU64 = decoderProto["readU64AsBigInt"];
const baseReadI64 = decoderProto["readI64AsBigInt"];
if (!baseEncodeNumber || !baseEncodeBigInt || !baseReadU64 || !baseReadI64) {
  throw new Error("shardq: unsupported @msgpack/msgpack version (see src/msgpack.ts)");
}

class WireEncoder extends Encoder {}
class WireDecoder extends Decoder {}
const wireEnc = WireEncoder.prototype as unknown as Hooks;
const wireDec = WireDecoder.prototype as unknown as Hooks;

wireEnc["encodeNumber"] = function (this: Hooks, n: unknown): unknown {
  const v = n as number;
  if (Number.isSafeInteger(v) && (v >= U32 || v < I32)) {
    return baseEncodeBigInt.call(this, BigInt(v));
  }
  return baseEncodeNumber.call(this, v);
};
wireEnc["encodeBigInt64"] = function (this: Hooks, n: unknown): unknown {
  const v = n as bigint;
  if (v >= MIN && v <= MAX) return wireEnc["encodeNumber"].call(this, Number(v));
  if (v >= 2n ** 64n || v < -(2n ** 63n)) throw new RangeError(`integer ${v} does not fit in 64 bits`);
  return baseEncodeBigInt.call(this, v);
};
wireDec["readU64AsBigInt"] = function (this: Hooks): unknown {
  const v = baseReadU64.call(this) as bigint;
  return v <= MAX ? Number(v) : v;
};
wireDec["readI64AsBigInt"] = function (this: Hooks): unknown {
  const v = baseReadI64.call(this) as bigint;
  return v >= MIN && v <= MAX ? Number(v) : v;
};

const encoder = new WireEncoder({ useBigInt64: true, ignoreUndefined: false });
const decoder = new WireDecoder({ useBigInt64: true });

/** Pack one value (undefined packs as nil). */
export function pack(value: unknown): Uint8Array {
  return encoder.encode(value);
}

/** Pack one value into the encoder's own buffer: valid only until the next pack. */
export function packShared(value: unknown): Uint8Array {
  return encoder.encodeSharedRef(value);
}

/** Unpack one msgpack value. Throws on malformed input. */
export function unpack(bytes: Uint8Array): unknown {
  return decoder.decode(bytes);
}

/** Decode a payload the broker stores opaquely (job data, results); other values pass. */
export function unpackPayload(value: unknown): unknown {
  return value instanceof Uint8Array ? unpack(value) : value;
}
