/**
 * `FlowProducer.add`: a parent job and its children, written all or nothing
 * (docs/protocol.md "Flows"), with BullMQ's `FlowJob` shape:
 *
 *     await flow.add({ name: "merge", queueName: "report", data: {},
 *                      children: [{ name: "render", queueName: "pages", data: { p: 1 } }] });
 *
 * 1. FLOW_ADD_CHILDREN per child queue (children `pending`, never handed out);
 * 2. FLOW_ADD_PARENT, the commit point (parent `waiting-children`);
 * 3. FLOW_COMMIT per child queue (children waiting). A failure in 3 is left
 *    to the brokers, which commit after the deadline by asking the parent's owner.
 * Ids are made here once, so every retried request is idempotent. One level of children.
 */
import { ConnectionInput, ShardqClient, resolveConnection } from "./client.js";
import { BadRequestError, errorFromWire } from "./errors.js";
import { Job } from "./job.js";
import { pack } from "./msgpack.js";
import { JobsOptions, wireOpts } from "./options.js";
import { partitionFor, partitionName } from "./slots.js";
import { uuid7 } from "./uuid7.js";

export interface FlowJob {
  name: string;
  queueName: string;
  data?: unknown;
  opts?: JobsOptions & { ignoreDependencyOnFailure?: boolean; failParentOnFailure?: boolean };
  children?: FlowJob[];
}

export interface JobNode { job: Job; children?: JobNode[] }

export class FlowProducer {
  readonly client: ShardqClient;
  private readonly ownsClient: boolean;

  constructor(opts: { connection: ConnectionInput }) {
    [this.client, this.ownsClient] = resolveConnection(opts?.connection);
  }

  private node(spec: FlowJob, what: string): { stored: string; item: unknown[]; ignore: boolean; job: Job } {
    if (!spec || typeof spec.queueName !== "string" || !spec.queueName || typeof spec.name !== "string") {
      throw new BadRequestError(`${what} needs a queueName and a name`);
    }
    const opts = { ...(spec.opts ?? {}) };
    const ignore = Boolean(opts.ignoreDependencyOnFailure);
    delete opts.ignoreDependencyOnFailure;
    delete opts.failParentOnFailure; // shardq's default: a child failing for good fails the parent
    const id = opts.jobId ?? uuid7();
    const p = this.client.topology.topo.partitions.get(spec.queueName);
    const stored = p ? partitionName(spec.queueName, partitionFor(opts.partitionKey ?? id, p)) : spec.queueName;
    const job = new Job(this.client, spec.queueName, spec.name, spec.data ?? null, opts, id);
    job.partition = stored;
    return { stored, item: [id, spec.name, pack(spec.data ?? null), wireOpts(opts)], ignore, job };
  }

  /**
   * Add a flow; resolves to its tree of jobs.
   * @param timeoutMs the creation deadline: a flow not fully written by then is removed by the brokers.
   * @throws BadRequestError a malformed flow; ShardqError it could not be written (nothing of it runs).
   */
  async add(flow: FlowJob, { timeoutMs = 30_000 }: { timeoutMs?: number } = {}): Promise<JobNode> {
    await this.client.ready();
    const parent = this.node(flow, "the flow");
    const children = flow.children ?? [];
    if (!children.length) throw new BadRequestError("a flow needs a non-empty list of children");
    const byQueue = new Map<string, unknown[][]>();
    const nodes: JobNode[] = [];
    children.forEach((spec, i) => {
      if (spec.children?.length) throw new BadRequestError("flows have one level: a child cannot have children");
      const c = this.node(spec, `child ${i}`);
      let list = byQueue.get(c.stored);
      if (!list) byQueue.set(c.stored, (list = []));
      list.push([...c.item, c.ignore]);
      nodes.push({ job: c.job });
    });
    const flowId = uuid7();
    const deadline = Date.now() + timeoutMs;
    const replies = await Promise.all([...byQueue].map(([q, jobs]) => this.client.call(q, "FLOW_ADD_CHILDREN",
      { flow: flowId, deadline, queue: q, parent: [parent.stored, parent.item[0]], jobs })));
    for (const reply of replies as unknown[][]) {
      for (const it of reply) if (Array.isArray(it)) throw errorFromWire(String(it[0]), it[1]);
    }
    await this.client.call(parent.stored, "FLOW_ADD_PARENT",
      { flow: flowId, deadline, queue: parent.stored, children: nodes.length, job: parent.item });
    await Promise.allSettled([...byQueue.keys()].map((q) => this.client.call(q, "FLOW_COMMIT", { queue: q, flow: flowId })));
    return { job: parent.job, children: nodes };
  }

  async close(): Promise<void> {
    if (this.ownsClient) await this.client.close();
  }
}
