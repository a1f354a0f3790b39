import { EventEmitter } from 'node:events';
import { ErrorCodes, VeshError } from '../errors.js';
import { closeFd, dupFd, recvFrame, sendFrame, watch, type FdWatch } from './fdpass.js';

export interface FrameChannelOptions {
  /** The largest frame taken from the peer (and sent to it); a bigger one is 'malformed'. */
  maxFrameBytes: number;
  /** Names the peer in error messages, e.g. "worker 3". */
  name: string;
  /** Bytes queued for a peer that does not read before the channel gives up (default 16 MiB). */
  maxQueuedBytes?: number;
}

interface QueuedFrame {
  data: Buffer;
  /** Our own duplicates: the caller's copies may be closed before the frame goes out. */
  fds: number[];
}

/** SCM_RIGHTS descriptors per frame (the addon's fixed control buffer). */
export const MAX_FDS_PER_FRAME = 16;

/** Keys that must never reach an object built from a peer's frame (prototype pollution). */
const FORBIDDEN_KEYS = new Set(['__proto__', 'constructor', 'prototype']);

function dropForbiddenKeys(key: string, value: unknown): unknown {
  return FORBIDDEN_KEYS.has(key) ? undefined : value;
}

function closeAll(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      closeFd(fd);
    } catch { /* already gone: nothing left to free */ }
  }
}

/**
 * JSON messages over one AF_UNIX SOCK_SEQPACKET socket, one message per
 * datagram, with descriptors attached (SCM_RIGHTS). The peer may be hostile
 * (the broker reads frames from workers that parse network input): every
 * frame is bounded by maxFrameBytes, parsed by JSON.parse without prototype
 * keys, and a frame we cannot take ends the channel.
 *
 * Events:
 * - 'frame' (msg: unknown, fds: number[]): the listener owns the fds (close-on-exec);
 * - 'malformed' (reason: string): bad JSON, over-size, truncated or unexpected
 *   control data; its descriptors are closed already and the channel closes;
 * - 'error' (err: Error): sending failed or the peer left more than
 *   maxQueuedBytes unread; the channel closes;
 * - 'close': once, after which nothing else is emitted.
 *
 * Descriptors given to send() stay the caller's: the kernel takes its own
 * reference at sendmsg time, and a frame that has to wait is queued with
 * duplicates the channel closes once it went out (or at close).
 */
export class FrameChannel extends EventEmitter {
  private readonly fd: number;
  private readonly maxFrameBytes: number;
  private readonly maxQueuedBytes: number;
  readonly name: string;
  private readonly watcher: FdWatch;
  /** Frames waiting for room, oldest at `queueHead` (Array#shift is linear in the length). */
  private queue: Array<QueuedFrame | undefined> = [];
  private queueHead = 0;
  private queuedBytes = 0;
  private closed = false;

  constructor(fd: number, opts: FrameChannelOptions) {
    super();
    if (!Number.isInteger(opts.maxFrameBytes) || opts.maxFrameBytes < 1) {
      throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `frame channel ${opts.name}: maxFrameBytes must be a positive integer`);
    }
    this.fd = fd;
    this.maxFrameBytes = opts.maxFrameBytes;
    this.maxQueuedBytes = opts.maxQueuedBytes ?? 16 * 1024 * 1024;
    this.name = opts.name;
    this.watcher = watch(fd, (readable, writable, error) => this.onEvent(readable, writable, error));
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Sends msg as one frame, now or (when the socket is full) after the frames
   * queued before it. A message over maxFrameBytes throws (the sender's bug);
   * after close it is dropped, as the 'close' event already told.
   */
  send(msg: unknown, fds: number[] = []): void {
    const text = JSON.stringify(msg);
    if (text === undefined) {
      throw new VeshError(ErrorCodes.INTERNAL, `frame channel ${this.name}: a message must be JSON (got ${typeof msg})`);
    }
    const data = Buffer.from(text, 'utf8');
    if (data.length > this.maxFrameBytes) {
      throw new VeshError(ErrorCodes.INTERNAL, `frame channel ${this.name}: a ${data.length}-byte message is over the ${this.maxFrameBytes}-byte frame limit`);
    }
    if (fds.length > MAX_FDS_PER_FRAME) {
      throw new VeshError(ErrorCodes.INTERNAL, `frame channel ${this.name}: ${fds.length} descriptors in one frame, at most ${MAX_FDS_PER_FRAME}`);
    }
    if (this.closed) return;
    if (this.queueHead === this.queue.length) {
      try {
        if (sendFrame(this.fd, data, fds)) return;
      } catch (err) {
        this.fail(new VeshError(ErrorCodes.INTERNAL, `frame channel ${this.name}: sending failed (${(err as Error).message})`, { cause: err }));
        return;
      }
    }
    if (this.queuedBytes + data.length > this.maxQueuedBytes) {
      this.fail(new VeshError(ErrorCodes.LIMIT_REACHED, `frame channel ${this.name}: the peer left over ${this.maxQueuedBytes} bytes unread`));
      return;
    }
    const dups: number[] = [];
    try {
      for (const fd of fds) dups.push(dupFd(fd));
    } catch (err) {
      closeAll(dups);
      this.fail(new VeshError(ErrorCodes.INTERNAL, `frame channel ${this.name}: could not keep a descriptor for a queued frame (${(err as Error).message})`, { cause: err }));
      return;
    }
    this.queue.push({ data, fds: dups });
    this.queuedBytes += data.length;
    this.watcher.setWritable(true);
  }

  /** Stops watching, closes the socket and any queued descriptors; emits 'close' once. Idempotent. */
  close(): void {
    this.shut(undefined);
  }

  private fail(err: Error): void {
    this.shut(err);
  }

  /** Frees everything now; the events follow on the next tick, 'error' (if any) before 'close'. */
  private shut(err: Error | undefined): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.close();
    closeAll([this.fd]);
    for (let i = this.queueHead; i < this.queue.length; i++) closeAll(this.queue[i]!.fds);
    this.queue = [];
    this.queueHead = 0;
    this.queuedBytes = 0;
    process.nextTick(() => {
      if (err !== undefined) this.emit('error', err);
      this.emit('close');
    });
  }

  private onEvent(readable: boolean, writable: boolean, error: boolean): void {
    if (this.closed) return;
    if (writable) this.flush();
    if (readable || error) this.readAll(error);
  }

  private flush(): void {
    while (!this.closed && this.queueHead < this.queue.length) {
      const head = this.queue[this.queueHead]!;
      let sent: boolean;
      try {
        sent = sendFrame(this.fd, head.data, head.fds);
      } catch (err) {
        this.fail(new VeshError(ErrorCodes.INTERNAL, `frame channel ${this.name}: sending failed (${(err as Error).message})`, { cause: err }));
        return;
      }
      if (!sent) return;
      this.queue[this.queueHead++] = undefined;
      this.queuedBytes -= head.data.length;
      closeAll(head.fds);
      if (this.queueHead >= 1024 && this.queueHead * 2 >= this.queue.length) {
        this.queue = this.queue.slice(this.queueHead);
        this.queueHead = 0;
      }
    }
    this.queue = [];
    this.queueHead = 0;
    if (!this.closed) this.watcher.setWritable(false);
  }

  private readAll(pollError: boolean): void {
    while (!this.closed) {
      let got: ReturnType<typeof recvFrame>;
      try {
        got = recvFrame(this.fd, this.maxFrameBytes);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ETRUNC' || code === 'EBADMSG') {
          this.malformed(code === 'ETRUNC' ? `a frame over ${this.maxFrameBytes} bytes or 16 descriptors` : 'control data other than descriptors');
        } else if (code === 'ECONNRESET' || code === 'EPIPE') {
          this.close();
        } else {
          this.fail(new VeshError(ErrorCodes.INTERNAL, `frame channel ${this.name}: receiving failed (${(err as Error).message})`, { cause: err }));
        }
        return;
      }
      if (got === false) {
        this.close();
        return;
      }
      if (got === null) {
        if (pollError) this.fail(new VeshError(ErrorCodes.INTERNAL, `frame channel ${this.name}: the event loop reported an error on the socket`));
        return;
      }
      let msg: unknown;
      try {
        msg = JSON.parse(got.data.toString('utf8'), dropForbiddenKeys);
      } catch {
        closeAll(got.fds);
        this.malformed('a frame that is not JSON');
        return;
      }
      // Nobody to own them: the descriptors would leak.
      if (!this.emit('frame', msg, got.fds)) closeAll(got.fds);
    }
  }

  private malformed(reason: string): void {
    this.emit('malformed', `frame channel ${this.name}: ${reason}`);
    this.close();
  }
}
