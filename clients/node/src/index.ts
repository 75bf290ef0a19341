/**
 * shardq for Node.js: BullMQ's API shape over shardq's wire protocol
 * (docs/protocol.md in the shardq repository).
 */
export { ShardqClient, resolveConnection } from "./client.js";
export type { ConnectionInput, ConnectionOptions } from "./client.js";
export { Queue, COUNT_TYPES } from "./queue.js";
export type { QueueOptions, BulkJob, RepeatOptions, JobTemplate, CountType } from "./queue.js";
export { Worker } from "./worker.js";
export type { WorkerOptions, Processor } from "./worker.js";
export { Job } from "./job.js";
export type { JobState } from "./job.js";
export { FlowProducer } from "./flow.js";
export type { FlowJob, JobNode } from "./flow.js";
export { QueueEvents } from "./events.js";
export type { JobsOptions, BackoffOptions, KeepJobs } from "./options.js";
export { wireOpts } from "./options.js";
export * from "./errors.js";
export { Connection, PROTOCOL_VERSION, splitAddr } from "./connection.js";
export { encodeFrame, FrameDecoder, BadFrame, DEFAULT_MAX_FRAME } from "./codec.js";
export { pack, unpack } from "./msgpack.js";
export { murmur3x64 } from "./murmur.js";
export { hash64, slotOf, partitionFor, partitionName, NUM_SLOTS } from "./slots.js";
export { Topology, TopologyManager } from "./topology.js";
export { uuid7 } from "./uuid7.js";
