/**
 * One catalogue of error codes. Every error that reaches a person carries a
 * stable code, a message for the admin (what is wrong and what to do) and,
 * separately, a short message that is safe to show an SSH user.
 */
export const ErrorCodes = {
  CONFIG_INVALID: 'VESH_CONFIG_INVALID',
  CONFIG_NOT_FOUND: 'VESH_CONFIG_NOT_FOUND',
  ACCOUNTS_INVALID: 'VESH_ACCOUNTS_INVALID',
  ACCOUNTS_BUSY: 'VESH_ACCOUNTS_BUSY',
  ACCOUNT_EXISTS: 'VESH_ACCOUNT_EXISTS',
  ACCOUNT_NOT_FOUND: 'VESH_ACCOUNT_NOT_FOUND',
  INVALID_NAME: 'VESH_INVALID_NAME',
  INVALID_LIMIT: 'VESH_INVALID_LIMIT',
  INVALID_ARGUMENT: 'VESH_INVALID_ARGUMENT',
  VE_EXISTS: 'VESH_VE_EXISTS',
  VE_NOT_FOUND: 'VESH_VE_NOT_FOUND',
  VE_STATE: 'VESH_VE_STATE',
  VE_START_FAILED: 'VESH_VE_START_FAILED',
  VE_BUSY: 'VESH_VE_BUSY',
  TEMPLATE_NOT_FOUND: 'VESH_TEMPLATE_NOT_FOUND',
  TEMPLATE_EXISTS: 'VESH_TEMPLATE_EXISTS',
  TEMPLATE_IN_USE: 'VESH_TEMPLATE_IN_USE',
  TEMPLATE_BUILD_FAILED: 'VESH_TEMPLATE_BUILD_FAILED',
  RUNTIME_MISSING: 'VESH_RUNTIME_MISSING',
  RUNTIME_FAILED: 'VESH_RUNTIME_FAILED',
  COMMAND_MISSING: 'VESH_COMMAND_MISSING',
  COMMAND_FAILED: 'VESH_COMMAND_FAILED',
  NETWORK_FAILED: 'VESH_NETWORK_FAILED',
  ADDRESS_EXHAUSTED: 'VESH_ADDRESS_EXHAUSTED',
  /** Every VE id range (runtime.idRanges) is held by a VE. */
  VE_ID_RANGES_EXHAUSTED: 'VESH_VE_ID_RANGES_EXHAUSTED',
  DISK_FULL: 'VESH_DISK_FULL',
  NOT_ROOT: 'VESH_NOT_ROOT',
  AUTH_FAILED: 'VESH_AUTH_FAILED',
  /** A cap of vesh.yaml `sessions:` refused a connection, session or forward helper. */
  LIMIT_REACHED: 'VESH_LIMIT_REACHED',
  /** vesh.yaml has no `cluster: { enabled: true }` but a cluster verb or option was used. */
  CLUSTER_OFF: 'VESH_CLUSTER_OFF',
  /** etcd did not answer within cluster.etcd.timeout (down, wrong endpoints, TLS or auth). */
  CLUSTER_UNAVAILABLE: 'VESH_CLUSTER_UNAVAILABLE',
  /** Another live process holds this node's name in the cluster. */
  CLUSTER_NODE_TAKEN: 'VESH_CLUSTER_NODE_TAKEN',
  /** A record read from etcd failed its schema or size bound (a damaged or hostile writer). */
  CLUSTER_RECORD_INVALID: 'VESH_CLUSTER_RECORD_INVALID',
  /** The VE is placed on another node (routing between nodes is not built yet), or no node can take it. */
  VE_ELSEWHERE: 'VESH_VE_ELSEWHERE',
  INTERNAL: 'VESH_INTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

export class VeshError extends Error {
  readonly code: ErrorCode;
  /** What an SSH user may be told; never includes host paths or internals. */
  readonly userMessage: string;
  readonly details?: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, opts: { userMessage?: string; details?: Record<string, unknown>; cause?: unknown } = {}) {
    super(message, opts.cause !== undefined ? { cause: opts.cause } : undefined);
    this.name = 'VeshError';
    this.code = code;
    this.userMessage = opts.userMessage ?? 'The server could not complete the request.';
    this.details = opts.details;
  }
}

export function isVeshError(err: unknown, code?: ErrorCode): err is VeshError {
  return err instanceof VeshError && (code === undefined || err.code === code);
}

/** Message of any thrown value, for logs. */
export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}
