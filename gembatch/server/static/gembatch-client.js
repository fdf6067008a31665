// gembatch-client.js: a small browser client for `gembatch serve` (an ES module, no build step).
//
// Why: seed 003's client patterns (poll `/api/job/{id}/status` every 2 s, or follow the
// job's Server-Sent Events) work against gembatch as written, except that a browser's
// EventSource cannot POST or send an Authorization header. This module wraps both patterns
// (`watchJob`, seed 003's `useJob` without React), follows streams with EventSource where it
// can (`?access_token=` carries the token), and reads the POST stream
// (`POST /api/job/batch/stream`: create and follow in one request) with fetch and a
// ReadableStream, resuming on the GET stream with Last-Event-ID if the connection drops.
//
//   import { GembatchClient, watchJob } from '/static/gembatch-client.js';
//   const client = new GembatchClient({ token: 'optional bearer token' });
//   const { job_id } = await client.createJob(file, { model: 'gemini-2.5-flash' });
//   const stop = watchJob(client, job_id, (state) => render(state), { useSSE: true });

/** The statuses a job never leaves (except by an explicit retry). */
export const TERMINAL_STATUSES = Object.freeze(['completed', 'failed', 'cancelled']);
/** The SSE event types of a job stream; the stream ends after `completed` or `error`. */
export const EVENT_TYPES = Object.freeze(['status', 'progress', 'completed', 'error', 'ping']);
const TERMINAL_EVENTS = new Set(['completed', 'error']);
const RESUME_ATTEMPTS = 5;

/** An answer other than 2xx, or no answer at all (`status` 0). `message` is plain words. */
export class ApiError extends Error {
  constructor(status, detail, message) {
    super(message ?? describeDetail(status, detail));
    this.name = 'ApiError';
    this.status = status;
    this.detail = detail;
  }

  static async fromResponse(response) {
    let detail = null;
    const text = await response.text().catch(() => '');
    try {
      detail = JSON.parse(text).detail ?? text;
    } catch {
      detail = text || response.statusText;
    }
    return new ApiError(response.status, detail);
  }
}

/** The service's `detail` (a string, FastAPI's list of `{loc, msg}`, or `{code, message}`)
 * as one readable sentence. */
export function describeDetail(status, detail) {
  if (status === 401) {
    return 'This service needs an API token, and none or a wrong one was given.';
  }
  if (Array.isArray(detail)) {
    return detail.map((item) => `${where(item.loc)}${item.msg ?? JSON.stringify(item)}`).join('; ');
  }
  if (detail && typeof detail === 'object') {
    return detail.message ?? JSON.stringify(detail);
  }
  if (typeof detail === 'string' && detail) return detail;
  return status ? `The service answered ${status}.` : 'The service could not be reached.';
}

function where(loc) {
  if (!Array.isArray(loc) || loc.length === 0) return '';
  const parts = loc[0] === 'body' ? loc.slice(1) : loc;
  if (parts[0] === 'input' && parts[1] === 'line') return `line ${parts[2]} of the file: `;
  if (parts[0] === 'input') return 'the file: ';
  if (parts.length === 0) return '';
  return `${parts.join('.')}: `;
}

/**
 * Read a `text/event-stream` body (a fetch Response) and call `onEvent({type, data, id})`
 * for each event, as the HTML spec's EventSource parser would: `data` lines joined by
 * newlines (then parsed as JSON when they are JSON), `id` kept across events, comments
 * ignored, an unterminated last event dropped. Resolves when the server ends the stream.
 */
export async function readEventStream(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let skipLineFeed = false; // a chunk ended in '\r': a '\n' starting the next is the same break
  let type = '';
  let data = [];
  let lastEventId = null;

  const line = (text) => {
    if (text === '') {
      if (data.length > 0) {
        onEvent({ type: type || 'message', data: parseData(data.join('\n')), id: lastEventId });
      }
      type = '';
      data = [];
      return;
    }
    if (text.startsWith(':')) return; // a comment (keep-alive)
    const colon = text.indexOf(':');
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? '' : text.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') type = value;
    else if (field === 'data') data.push(value);
    else if (field === 'id' && !value.includes('\0')) lastEventId = value;
  };

  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    let chunk = value;
    if (skipLineFeed && chunk.startsWith('\n')) chunk = chunk.slice(1);
    buffer += chunk;
    skipLineFeed = buffer.endsWith('\r');
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const text of lines) line(text);
  }
  return { lastEventId };
}

function parseData(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(signal.reason ?? new DOMException('aborted', 'AbortError'));
    });
  });
}

export class GembatchClient {
  /**
   * @param {object} [options]
   * @param {string} [options.baseUrl] where the service is ('' : this page's origin)
   * @param {string|null} [options.token] a bearer token, when the service requires one
   */
  constructor({ baseUrl = '', token = null } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.token = token || null;
  }

  url(path, query) {
    const url = new URL(this.baseUrl + path, window.location.href);
    for (const [name, value] of Object.entries(query ?? {})) {
      if (value !== undefined && value !== null && value !== '') {
        url.searchParams.set(name, String(value));
      }
    }
    return url.href;
  }

  headers(extra = {}) {
    const headers = { Accept: 'application/json', ...extra };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    return headers;
  }

  /** fetch, with the token; a non-2xx answer or no answer throws an ApiError. */
  async fetch(method, path, { query, json, body, headers, signal } = {}) {
    const sent = this.headers(headers);
    if (json !== undefined) {
      sent['Content-Type'] = 'application/json';
      body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(this.url(path, query), { method, headers: sent, body, signal });
    } catch (error) {
      if (error?.name === 'AbortError') throw error;
      throw new ApiError(0, null, `The service could not be reached (${error.message}).`);
    }
    if (!response.ok) throw await ApiError.fromResponse(response);
    return response;
  }

  async json(method, path, options) {
    return (await this.fetch(method, path, options)).json();
  }

  // -- reading ---------------------------------------------------------------------------
  /** `GET /api/jobs`: the caller's jobs, newest first; `status` filters. */
  listJobs({ status, limit = 100, offset = 0 } = {}) {
    return this.json('GET', '/api/jobs', { query: { status, limit, offset } });
  }

  /** `GET /api/job/{id}/status`: seed 003's JobStatus. */
  jobStatus(jobId) {
    return this.json('GET', `/api/job/${encodeURIComponent(jobId)}/status`);
  }

  /** `GET /api/job/{id}/results`: `{blob, filename}` of the results file. */
  async downloadResults(jobId) {
    const response = await this.fetch('GET', `/api/job/${encodeURIComponent(jobId)}/results`, {
      headers: { Accept: 'application/x-ndjson' },
    });
    const disposition = response.headers.get('content-disposition') ?? '';
    const match = /filename="?([^";]+)"?/.exec(disposition);
    return { blob: await response.blob(), filename: match ? match[1] : `${jobId}.results.jsonl` };
  }

  // -- creating --------------------------------------------------------------------------
  /** The body of a create request: a File/Blob (the JSONL, with `options` as JSON), a
   * ready FormData, or a JSON body (`{requests: [...]}` or `{input_file}` plus options). */
  createBody(input, options = {}) {
    if (input instanceof FormData) return { body: input };
    if (input instanceof Blob) {
      const form = new FormData();
      form.append('file', input, input.name ?? 'input.jsonl');
      if (Object.keys(options).length > 0) form.append('options', JSON.stringify(options));
      return { body: form };
    }
    return { json: { ...input, ...options } };
  }

  /** `POST /api/job/batch`: `{job_id, status, message, warnings}`. */
  createJob(input, options = {}) {
    return this.json('POST', '/api/job/batch', this.createBody(input, options));
  }

  /**
   * `POST /api/job/batch/stream`: create a job and follow its events in one request.
   * EventSource cannot POST, so this reads the stream with fetch. If the connection drops
   * before `completed` or `error`, it resumes on `GET /api/job/{id}/stream` with
   * Last-Event-ID: no event is lost or repeated. Resolves with `{jobId, last}` (the
   * terminal event) when the job ends; `signal` stops following.
   */
  async createAndStream(input, options, onEvent, { signal } = {}) {
    let jobId = null;
    let lastEventId = null;
    let last = null;
    const handle = (event) => {
      if (event.id !== null) lastEventId = event.id;
      if (jobId === null && event.data?.job_id) jobId = event.data.job_id;
      if (TERMINAL_EVENTS.has(event.type)) last = event;
      onEvent(event);
    };
    try {
      const response = await this.fetch('POST', '/api/job/batch/stream', {
        ...this.createBody(input, options),
        headers: { Accept: 'text/event-stream' },
        signal,
      });
      await readEventStream(response, handle);
    } catch (error) {
      if (jobId === null || error?.name === 'AbortError') throw error;
    }
    if (last === null && jobId !== null) {
      last = await this.followStream(jobId, handle, { lastEventId, signal });
    }
    return { jobId, last };
  }

  /**
   * Follow `GET /api/job/{id}/stream` with fetch (headers allowed, so no token in the
   * URL), from `lastEventId` on, reconnecting after a drop. Resolves with the terminal
   * event.
   */
  async followStream(jobId, onEvent, { lastEventId = null, signal } = {}) {
    let failures = 0;
    for (;;) {
      let last = null;
      try {
        const headers = { Accept: 'text/event-stream' };
        if (lastEventId !== null) headers['Last-Event-ID'] = lastEventId;
        const response = await this.fetch('GET', `/api/job/${encodeURIComponent(jobId)}/stream`, {
          headers,
          signal,
        });
        await readEventStream(response, (event) => {
          if (event.id !== null) lastEventId = event.id;
          if (TERMINAL_EVENTS.has(event.type)) last = event;
          failures = 0;
          onEvent(event);
        });
        if (last !== null) return last;
      } catch (error) {
        const final = error?.name === 'AbortError' || (error.status >= 400 && error.status < 500);
        if (final || failures >= RESUME_ATTEMPTS) throw error;
      }
      failures += 1;
      await sleep(500 * failures, signal);
    }
  }

  // -- changing --------------------------------------------------------------------------
  /** Cancel a pending or running job (seed 004's updateBatchJob); 409 for other states. */
  cancelJob(jobId) {
    return this.json('POST', '/job-operations', {
      json: { action: 'updateBatchJob', data: { job_id: jobId, status: 'cancelled' } },
    });
  }

  /** `DELETE /api/job/{id}`: a running job answers 400 unless `force` (which cancels its
   * remote batch first, then deletes). */
  deleteJob(jobId, { force = false } = {}) {
    return this.json('DELETE', `/api/job/${encodeURIComponent(jobId)}`, {
      query: force ? { force: 'true' } : undefined,
    });
  }

  // -- following -------------------------------------------------------------------------
  /**
   * Follow a job's events with EventSource (seed 003's streaming pattern). EventSource
   * reconnects by itself with Last-Event-ID; it cannot send headers, so the token goes
   * in `?access_token=`. Calls `onEvent({type, data, id})` for the job's events and
   * `onTrouble(ApiError|null)` when the connection drops (null: reconnecting) or is
   * refused (the ApiError says why). Returns `close()`; closes itself after a terminal
   * event.
   */
  eventSource(jobId, onEvent, onTrouble = () => {}) {
    const query = this.token ? { access_token: this.token } : undefined;
    const source = new EventSource(this.url(`/api/job/${encodeURIComponent(jobId)}/stream`, query));
    for (const type of EVENT_TYPES) {
      source.addEventListener(type, (message) => {
        // The server's `error` event and EventSource's own connection error share a name;
        // only the server's has data.
        if (!(message instanceof MessageEvent)) return;
        if (TERMINAL_EVENTS.has(type)) source.close();
        onEvent({ type, data: parseData(message.data), id: message.lastEventId || null });
      });
    }
    source.addEventListener('error', (event) => {
      if (event instanceof MessageEvent) return;
      if (source.readyState === EventSource.CONNECTING) {
        onTrouble(null);
        return;
      }
      // Refused (401, 404, ...): EventSource does not say why; the status endpoint does.
      this.jobStatus(jobId).then(
        () => onTrouble(new ApiError(0, null, 'The live stream was refused.')),
        (error) => onTrouble(error),
      );
    });
    return () => source.close();
  }
}

/**
 * Seed 003's `useJob` without React: follow one job by polling (every `pollingInterval`
 * ms, 2000 as in seed 003) or by SSE (`useSSE: true`), and call
 * `onChange({status, progress, result, error, job, done, problem, reconnecting})` on every
 * change. `job` is the latest JobStatus; `error` is the job's own error (a failed or
 * cancelled job) or, when the service could not be asked, `problem.message` (`problem` is
 * the ApiError; a 401 or 404 ends the watch). `reconnecting` is true while an SSE
 * connection is being re-established. Returns `stop()`.
 */
export function watchJob(client, jobId, onChange, { pollingInterval = 2000, useSSE = false } = {}) {
  let stopped = false;
  let timer = null;
  let close = () => {};
  const emit = (job, problem = null, reconnecting = false) => {
    if (stopped) return;
    onChange({
      status: job?.status ?? null,
      progress: job?.progress ?? 0,
      result: job?.result ?? null,
      error: problem ? problem.message : (job?.error ?? null),
      job,
      done: TERMINAL_STATUSES.includes(job?.status),
      problem,
      reconnecting,
    });
  };

  if (useSSE) {
    close = client.eventSource(
      jobId,
      (event) => {
        if (event.type !== 'ping' && event.data && typeof event.data === 'object') emit(event.data);
      },
      (trouble) => emit(null, trouble, trouble === null),
    );
  } else {
    const poll = async () => {
      try {
        const job = await client.jobStatus(jobId);
        emit(job);
        if (TERMINAL_STATUSES.includes(job.status)) return;
      } catch (error) {
        emit(null, error);
        if (error.status === 401 || error.status === 404) return; // asking again won't help
      }
      if (!stopped) timer = setTimeout(poll, pollingInterval);
    };
    poll();
  }
  return () => {
    stopped = true;
    clearTimeout(timer);
    close();
  };
}
