/**
 * Sans-IO framing (docs/protocol.md "Framing"): a frame is a 4-byte
 * big-endian length and one msgpack value. Bytes in, values out; no sockets.
 */
import { packShared, unpack } from "./msgpack.js";
import { TooLargeError } from "./errors.js";

export const DEFAULT_MAX_FRAME = 16 * 1024 * 1024;

/** Pack `value` as one length-prefixed frame. */
export function encodeFrame(value: unknown): Buffer {
  const body = packShared(value); // a view of the encoder's buffer: copied once, below
  const out = Buffer.allocUnsafe(4 + body.length);
  out.writeUInt32BE(body.length, 0);
  out.set(body, 4);
  return out;
}

/** A frame that was delimited but did not decode (the stream stays in sync). */
export class BadFrame {
  constructor(readonly reason: string) {}
}

/**
 * Incremental decoder: `feed(chunk)` returns the frames completed so far.
 * It holds at most one partial frame; a length prefix over `maxFrame` is
 * refused before its body is buffered, so a peer cannot grow it unbounded.
 */
export class FrameDecoder {
  private buf: Buffer = Buffer.alloc(0);

  constructor(private readonly maxFrame: number = DEFAULT_MAX_FRAME) {}

  /**
   * @throws TooLargeError a length prefix over the limit (the stream cannot resync).
   */
  feed(chunk: Uint8Array): Array<unknown> {
    const buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    const frames: unknown[] = [];
    let pos = 0;
    while (buf.length - pos >= 4) {
      const size = buf.readUInt32BE(pos);
      if (size > this.maxFrame) {
        this.buf = Buffer.alloc(0);
        throw new TooLargeError(`frame of ${size} bytes exceeds limit ${this.maxFrame}`);
      }
      if (buf.length - pos - 4 < size) break;
      const start = pos + 4;
      pos = start + size;
      try {
        frames.push(unpack(buf.subarray(start, pos)));
      } catch (err) {
        frames.push(new BadFrame(String((err as Error).message ?? err)));
      }
    }
    // Copy the partial tail: decoded values may hold views of `buf`.
    this.buf = pos < buf.length ? Buffer.from(buf.subarray(pos)) : Buffer.alloc(0);
    return frames;
  }

  get buffered(): number {
    return this.buf.length;
  }
}

