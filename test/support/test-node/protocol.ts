/**
 * What the host's tests and the agent inside the test node say to each other: one
 * JSON object per line, over a virtio-serial port. The host asks, the agent answers
 * with the request's id; the agent also says once that it is ready.
 */

export type CsiService = 'identity' | 'controller' | 'group' | 'node';

export type AgentRequest =
  /** Runs a program to completion; `input` (base64) is its standard input. */
  | { id: number; op: 'exec'; argv: string[]; env?: Record<string, string>; cwd?: string; timeoutMs?: number; input?: string }
  /** Starts a long-running program; its output is kept (the last 1 MiB) for `output`. */
  | { id: number; op: 'spawn'; argv: string[]; env?: Record<string, string>; cwd?: string }
  | { id: number; op: 'output'; pid: number }
  /** Waits for a spawned program to end; answers `{ running: true }` if it has not within timeoutMs. */
  | { id: number; op: 'wait'; pid: number; timeoutMs: number }
  | { id: number; op: 'kill'; pid: number; signal: NodeJS.Signals }
  /** One CSI call over a unix socket inside the test node. */
  | { id: number; op: 'csi'; socketPath: string; service: CsiService; method: string; request: object }
  | { id: number; op: 'readFile'; path: string }
  | { id: number; op: 'writeFile'; path: string; data: string; mode?: number }
  /** The agent answers, then exits: the test node powers off. */
  | { id: number; op: 'poweroff' };

export interface ExecResult {
  status: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

export interface AgentError {
  message: string;
  /** A gRPC status, for a CSI call that failed. */
  code?: number;
  details?: string;
}

export type AgentMessage = { id: number; result?: unknown; error?: AgentError } | { event: 'ready'; uptimeSeconds: number; kernel: string };

/** The virtio-serial port's name, as QEMU's virtserialport is given it and the guest sees it in sysfs. */
export const agentPortName = 'arbor.agent';
