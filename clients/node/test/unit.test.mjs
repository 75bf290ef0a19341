// Pure parts, no sockets: option mapping, error mapping, ids, topology patches.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  BadRequestError, BusyError, LockLostError, MovedError, NotFoundError, ShardqClient, Topology, TryAgainError,
  UnknownServerError, errorFromWire, pack, unpack, uuid7, wireOpts,
} from "../dist/index.js";

describe("BullMQ options -> wire opts", () => {
  test("names map to the broker's", () => {
    assert.equal(wireOpts(undefined), null);
    assert.equal(wireOpts({}), null);
    assert.deepEqual(wireOpts({
      attempts: 3, backoff: { type: "exponential", delay: 250 }, delay: 1000, priority: 2, jobId: "x",
      removeOnComplete: { count: 10 }, removeOnFail: true, timestamp: 1_767_225_600_000, group: { id: "t7" },
      timeout: 5000, ttl: 60_000,
    }), {
      attempts: 3, backoff: { type: "exponential", delay_ms: 250 }, delay_ms: 1000, priority: 2,
      remove_on_complete: 10, remove_on_fail: true, timestamp: 1_767_225_600_000, group: "t7",
      timeout_ms: 5000, ttl_ms: 60_000,
    });
    assert.deepEqual(wireOpts({ backoff: 100 }), { backoff: { type: "fixed", delay_ms: 100 } });
  });

  test("what shardq does not do is refused, not ignored", () => {
    assert.throws(() => wireOpts({ lifo: true }), BadRequestError);
    assert.throws(() => wireOpts({ repeat: { every: 1000 } }), /upsertJobScheduler/);
    assert.throws(() => wireOpts({ removeOnComplete: { age: 3600 } }), BadRequestError);
  });

  test("a connection needs a coordinator URL or broker addresses", () => {
    assert.throws(() => new ShardqClient({ host: "127.0.0.1", port: 6379 }), /coordinator URL or at least one broker/);
    assert.equal(new ShardqClient("http://c:7070").coordinator, "http://c:7070");
    assert.deepEqual(new ShardqClient("a:1, b:2").seeds, ["a:1", "b:2"]);
  });
});

describe("wire errors -> typed errors", () => {
  test("each code has its class with typed fields", () => {
    const moved = errorFromWire("MOVED", { slot: 12, owner: "b2", addr: "h:2", epoch: 9, queue: "hot" });
    assert.ok(moved instanceof MovedError);
    assert.deepEqual([moved.slot, moved.owner, moved.addr, moved.epoch, moved.queue], [12, "b2", "h:2", 9, "hot"]);
    const ta = errorFromWire("TRYAGAIN", { retry_after_ms: 30, message: "frozen" });
    assert.ok(ta instanceof TryAgainError && ta.retryAfterMs === 30 && ta.message === "frozen");
    assert.ok(errorFromWire("BUSY", { retry_after_ms: 50 }) instanceof BusyError);
    assert.ok(errorFromWire("LOCK_LOST", "stale") instanceof LockLostError);
    assert.ok(errorFromWire("NOT_FOUND", "no") instanceof NotFoundError);
    const unknown = errorFromWire("NEW_CODE", { a: 1 });
    assert.ok(unknown instanceof UnknownServerError && unknown.code === "NEW_CODE");
    assert.equal(errorFromWire("BAD_REQUEST", "queue name must be a non-empty string").name, "BadRequestError");
  });
});

describe("ids and encoding", () => {
  test("uuid7 ids are unique and sort in creation order", () => {
    const ids = Array.from({ length: 20_000 }, () => uuid7());
    assert.equal(new Set(ids).size, ids.length);
    assert.deepEqual([...ids].sort(), ids);
    assert.equal(parseInt(ids[0].slice(0, 8) + ids[0].slice(9, 13), 16) <= Date.now(), true);
  });

  test("integers keep their type and width both ways", () => {
    for (const v of [0, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, -1, -32, -33, -(2 ** 31), -(2 ** 31) - 1, -(2 ** 53) + 1]) {
      assert.equal(unpack(pack(v)), v, String(v));
    }
    assert.equal(unpack(pack(2n ** 62n)), 2n ** 62n);
    assert.equal(unpack(pack(2n ** 64n - 1n)), 2n ** 64n - 1n);
    assert.equal(unpack(pack(5n)), 5);
    assert.equal(Buffer.from(pack(2 ** 40)).toString("hex"), "cf0000010000000000");
    assert.throws(() => pack(2n ** 64n), RangeError);
  });
});

describe("topology", () => {
  test("MOVED patches one slot unless it is older, and routes change", () => {
    const t = Topology.standalone("b1", "h:1");
    const e = new MovedError(7, "b2", "h:2", 5);
    assert.equal(t.isStale(e), false);
    t.patch(e);
    assert.equal(t.slotOwners[7], "b2");
    assert.equal(t.addrOf("b2"), "h:2");
    const older = new MovedError(7, "b3", "h:3", 4);
    assert.equal(t.isStale(older), true);
    t.patch(older);
    assert.equal(t.slotOwners[7], "b2");
    t.patch(new MovedError(7, "b2", "h:22", 5));
    assert.equal(t.addrOf("b2"), "h:22");
  });

  test("the map parses the coordinator's shape, overrides first", () => {
    const t = Topology.fromDict({
      term: 1, epoch: 3, brokers: { b1: { addr: "h:1", state: "active", weight: 1 }, b2: { addr: "h:2", state: "active", weight: 1 } },
      slots: [[0, 2047, "b1", 1], [2048, 4095, "b2", 3]], overrides: { hot: ["b2", 3] }, partitions: { wide: 4 }, moving: [],
    });
    assert.equal(t.epoch, 3);
    assert.deepEqual(t.route("hot"), ["b2", "h:2"]);
    assert.equal(t.partitions.get("wide"), 4);
    assert.equal(t.slotEpochs[4095], 3);
  });
});
