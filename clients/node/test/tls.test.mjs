// TLS to brokers (README "Security and limits"): a standalone broker with
// `shardq dev-certs` certificates; a client given the CA adds and reads a
// job, one trusting another CA gets TlsError at once (not retried).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { Queue, ShardqClient, TlsError } from "../dist/index.js";
import { Sandbox, runPython } from "./helpers.mjs";

describe("TLS to a broker", () => {
  const sb = new Sandbox();
  after(() => sb.cleanup());

  test("a client with the CA works; one without it gets TlsError", async () => {
    const certs = join(sb.dir, "certs");
    const other = join(sb.dir, "other");
    await runPython(`from pathlib import Path; from shardq.devcerts import make_dev_certs
make_dev_certs(Path(${JSON.stringify(certs)})); make_dev_certs(Path(${JSON.stringify(other)}))`);
    const { addr } = await sb.broker("t1", "--ssl-cert", join(certs, "broker.pem"),
      "--ssl-key", join(certs, "broker.key"));
    const client = new ShardqClient({ brokers: addr, tls: { ca: readFileSync(join(certs, "ca.pem")) } });
    try {
      const queue = new Queue("tls-q", { connection: client });
      await queue.add("a", { n: 1 }, { jobId: "j1" });
      const job = await queue.getJob("j1");
      assert.equal(job?.id, "j1");
    } finally {
      await client.close();
    }
    const started = performance.now();
    const wrong = new ShardqClient({ brokers: addr, tls: { ca: readFileSync(join(other, "ca.pem")) } });
    try {
      await assert.rejects(new Queue("tls-q", { connection: wrong }).add("a", {}), TlsError);
    } finally {
      await wrong.close();
    }
    assert.ok(performance.now() - started < 4000, "not retried for the whole budget");
  });
});
