// app.js: the job dashboard served by `gembatch serve` at `/`.
//
// Why: people who start batch jobs want to see them move without writing a client. This
// page lists the caller's jobs with live progress bars (Server-Sent Events: EventSource
// for jobs found in the list, the fetch-read POST stream for jobs created here, polling
// every 2 s when too many streams are open), and creates, cancels, deletes and downloads
// through the same public API as any other client (gembatch-client.js).

import { GembatchClient, TERMINAL_STATUSES, watchJob } from './gembatch-client.js';

const TOKEN_KEY = 'gembatch.token';
// Browsers open at most 6 HTTP/1.1 connections to one host; streams beyond this many
// would starve the page's own requests, so further jobs are polled instead.
const MAX_STREAMS = 4;
const POLL_MS = 2000; // seed 003's polling interval
const LIST_REFRESH_MS = 5000; // picks up jobs created elsewhere, and deletions

const STEP_WORDS = {
  validating: 'Checking the input file',
  uploading: 'Uploading the input to Gemini',
  submitting: 'Creating the Gemini batch',
  queued: 'Waiting in Gemini’s queue',
  processing: 'Gemini is answering the requests',
  downloading: 'Downloading the results',
  cleaning_up: 'Cleaning up remote files',
  finalizing: 'Finishing',
  cancelling: 'Cancelling the remote batch',
};

// What each error class means for the person looking at the job.
const ERROR_WORDS = {
  RATE_LIMITED: 'Gemini kept answering “too many requests”, and the retries ran out.',
  SERVER_ERROR: 'Gemini had server errors, and the retries ran out.',
  NETWORK: 'The service could not reach Gemini, and the retries ran out.',
  TIMEOUT: 'Gemini did not answer in time, and the retries ran out.',
  EXPIRED: 'Gemini did not run the batch within 48 hours, so it expired with no results.',
  BATCH_FAILED: 'Gemini reported the batch as failed.',
  INVALID_INPUT: 'Gemini refused the input: check the requests in the file.',
  AUTH: 'Gemini refused the service’s API key.',
  NOT_FOUND: 'Gemini does not know the model (or the batch is gone): check the model name.',
  DOWNLOAD: 'The results could not be downloaded completely.',
  LOCAL_IO: 'The service could not write its files (disk full, or no permission).',
  CANCELLED: 'The job was cancelled.',
  INTERNAL: 'gembatch hit an internal error; the service log has the details.',
};

const $ = (selector, root = document) => root.querySelector(selector);

class Dashboard {
  constructor() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const base = new URL('.', window.location.href).pathname;
    this.client = new GembatchClient({ baseUrl: base, token });
    this.rows = new Map(); // job id -> Row
    this.streams = 0;
    this.creating = 0; // uploads whose POST stream has not named its job yet
    this.deferred = new Set();
    this.listTimer = null;
    this.listing = null;
    this.again = false;
    this.authNeeded = false;
    this.uploading = false;
  }

  start() {
    $('#token-form').addEventListener('submit', (event) => {
      event.preventDefault();
      this.useToken($('#token-input').value.trim());
    });
    $('#token-forget').addEventListener('click', () => {
      this.useToken('');
      $('#token-input').focus(); // the button is disabled now: keep the keyboard nearby
    });
    $('#create-form').addEventListener('submit', (event) => {
      event.preventDefault();
      this.create();
    });
    $('#status-filter').addEventListener('change', () => this.reset());
    $('#refresh-button').addEventListener('click', () => this.refresh());
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') this.refresh();
    });
    this.showTokenState();
    this.refresh();
  }

  // -- token ---------------------------------------------------------------------------
  useToken(token) {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    this.client.token = token || null;
    $('#token-input').value = '';
    this.showTokenState();
    this.reset();
  }

  showTokenState() {
    $('#token-state').textContent = this.client.token
      ? 'A token is in use for this browser tab.'
      : 'No token in use (fine for a local single-user service).';
    $('#token-forget').disabled = !this.client.token;
  }

  /** A 401: say so once, and put the keyboard where the fix is. */
  needAuth() {
    const notice = $('#auth-needed');
    notice.textContent = this.client.token
      ? 'The service refused this token. Enter a valid API token above.'
      : 'This service needs an API token. Enter it above to see and create jobs.';
    notice.hidden = false;
    if (!this.authNeeded) $('#token-input').focus();
    this.authNeeded = true;
  }

  // -- the list ------------------------------------------------------------------------
  reset() {
    for (const row of this.rows.values()) row.remove();
    this.rows.clear();
    this.refresh();
  }

  /** Load the list now (and again every few seconds). */
  refresh() {
    clearTimeout(this.listTimer);
    if (this.listing) {
      this.again = true; // asked while a load runs (another filter, a new token): redo it
      return this.listing;
    }
    this.listing = this.loadList().finally(() => {
      this.listing = null;
      if (this.again) {
        this.again = false;
        this.refresh();
      } else {
        this.listTimer = setTimeout(() => this.refresh(), LIST_REFRESH_MS);
      }
    });
    return this.listing;
  }

  async loadList() {
    const asked = Date.now();
    const status = $('#status-filter').value;
    let answer;
    try {
      answer = await this.client.listJobs({ status });
    } catch (error) {
      if (error.status === 401) this.needAuth();
      else this.showListError(error);
      return;
    }
    if (this.again) return; // stale: the filter or the token changed meanwhile
    this.authNeeded = false;
    $('#auth-needed').hidden = true;
    $('#list-error').hidden = true;
    const seen = new Set();
    for (const job of answer.jobs) {
      seen.add(job.job_id);
      this.show(job);
    }
    for (const [jobId, row] of this.rows) {
      // Gone from the list (deleted elsewhere), unless it appeared after we asked.
      if (!seen.has(jobId) && row.addedAt < asked && !row.deleting) this.drop(jobId);
    }
    this.showEmpty();
  }

  showListError(error) {
    const notice = $('#list-error');
    notice.textContent = `Could not load the jobs: ${error.message}`;
    notice.hidden = false;
  }

  showEmpty() {
    $('#list-empty').hidden = this.rows.size > 0;
  }

  /** Add or update the row of `job` (a JobStatus), and follow it while it runs; `feed`
   * names a stream that already follows it (the POST stream of a job created here). */
  show(job, { feed = null } = {}) {
    let row = this.rows.get(job.job_id);
    const before = row?.job.status;
    if (!row) {
      row = new Row(this, job);
      this.rows.set(job.job_id, row);
      this.insert(row);
      this.showEmpty();
    } else {
      row.update(job);
    }
    if (feed && !row.following) {
      row.following = true;
      row.setFeed(feed);
    }
    if (before && before !== row.job.status && row.done) this.announce(row);
    if (!row.following && !row.done) {
      // A job new to the list while an upload waits for its first event may be that
      // upload's job: its POST stream will follow it, so wait rather than open a second.
      if (this.creating > 0 && before === undefined) this.deferred.add(row);
      else this.follow(row);
    }
    return row;
  }

  /** Follow the rows held back while an upload was starting (those it did not take). */
  followDeferred() {
    const rows = [...this.deferred];
    this.deferred.clear();
    for (const row of rows) {
      if (!row.following && !row.done && this.rows.get(row.job.job_id) === row) this.follow(row);
    }
  }

  /** Newest first, as the service lists them; existing rows are never moved (moving a row
   * would take the keyboard focus away from it). */
  insert(row) {
    const list = $('#jobs');
    for (const other of list.children) {
      const created = this.rows.get(other.dataset.jobId)?.job.created_at ?? '';
      if ((row.job.created_at ?? '') > created) {
        list.insertBefore(row.el, other);
        return;
      }
    }
    list.append(row.el);
  }

  drop(jobId) {
    const row = this.rows.get(jobId);
    if (!row) return;
    row.remove();
    this.rows.delete(jobId);
    this.showEmpty();
  }

  /** A live stream while fewer than MAX_STREAMS are open, polling otherwise (and when a
   * stream is refused for another reason than the token or a deleted job). */
  follow(row, { polling = false } = {}) {
    const useSSE = this.streams < MAX_STREAMS && !polling;
    if (useSSE) this.streams += 1;
    row.following = true;
    row.setFeed(useSSE ? 'sse' : 'poll');
    let open = true;
    const unwatch = watchJob(
      this.client,
      row.job.job_id,
      (state) => this.onState(row, state, useSSE),
      { useSSE, pollingInterval: POLL_MS },
    );
    row.stop = () => {
      unwatch();
      if (open && useSSE) this.streams -= 1;
      open = false;
      row.following = false;
    };
  }

  /** A change seen by `watchJob` (a stream event or a poll). */
  onState(row, state, viaSSE) {
    if (state.reconnecting) return row.trouble(null);
    const problem = state.problem;
    if (problem) {
      row.trouble(problem);
      if (problem.status === 401 || problem.status === 404) return row.stop?.();
      if (viaSSE && row.following) {
        row.stop();
        this.follow(row, { polling: true }); // no stream: keep the bar alive by polling
      }
      return;
    }
    this.onEvent(row, { type: state.done ? 'end' : 'change', data: state.job });
  }

  /** One job snapshot from a stream (EventSource, the POST stream) or a poll. */
  onEvent(row, event) {
    if (event.type === 'ping' || !event.data || typeof event.data !== 'object') return;
    row.trouble(undefined);
    if (event.data.code === 'DELETED') {
      this.drop(row.job.job_id);
      return;
    }
    this.show(event.data);
    if (row.done) row.stop?.();
  }

  announce(row) {
    const words = { completed: 'completed', failed: 'failed', cancelled: 'was cancelled' };
    $('#announcer').textContent = `Job ${row.name} ${words[row.job.status] ?? row.job.status}.`;
  }

  // -- actions -------------------------------------------------------------------------
  /** Upload the chosen file with the form's options, and follow the new job's stream. */
  async create() {
    if (this.uploading) return; // one upload at a time (the button says so meanwhile)
    const error = $('#create-error');
    const state = $('#create-state');
    const button = $('#create-button');
    error.hidden = true;
    const file = $('#file-input').files[0];
    if (!file) {
      showError(error, 'Choose a JSONL file to upload.');
      $('#file-input').focus();
      return;
    }
    let options;
    try {
      options = formOptions();
    } catch (problem) {
      showError(error, problem.message);
      $('#options-input').focus();
      return;
    }
    // aria-disabled, not disabled: a disabled button loses the keyboard focus.
    this.uploading = true;
    button.setAttribute('aria-disabled', 'true');
    state.textContent = `Uploading ${file.name}…`;
    const finished = () => {
      this.uploading = false;
      button.removeAttribute('aria-disabled');
      state.textContent = '';
    };
    if (this.streams >= MAX_STREAMS) {
      try {
        const created = await this.client.createJob(file, options);
        const row = this.show(await this.client.jobStatus(created.job_id));
        this.created(row, created.warnings);
      } catch (problem) {
        this.createFailed(problem);
      }
      finished();
      return;
    }
    // Create and follow in one request: the POST stream (which EventSource cannot do).
    this.streams += 1;
    this.creating += 1;
    let row = null;
    let owns = false; // this stream feeds the row (not one a list refresh opened first)
    const abort = new AbortController();
    const onEvent = (event) => {
      if (row === null && event.data?.job_id) {
        row = this.rows.get(event.data.job_id) ?? null;
        if (row?.following) {
          abort.abort(); // a list refresh found the job first and follows it already
        } else {
          row = this.show(event.data, { feed: 'post-stream' });
          owns = true;
          row.stop = () => abort.abort();
        }
        this.creating -= 1;
        this.followDeferred();
        finished();
        this.created(row, []);
      }
      if (owns) this.onEvent(row, event);
    };
    try {
      await this.client.createAndStream(file, options, onEvent, { signal: abort.signal });
    } catch (problem) {
      if (row === null) this.createFailed(problem);
      else if (owns && problem?.name !== 'AbortError') row.trouble(problem);
    } finally {
      this.streams -= 1;
      if (row === null) {
        this.creating -= 1;
        this.followDeferred();
        finished();
      }
      if (owns) {
        row.following = false;
        row.stop = null;
        if (!row.done && this.rows.has(row.job.job_id)) this.follow(row); // the stream broke
      }
    }
  }

  created(row, warnings) {
    $('#create-form').reset();
    const state = $('#create-state');
    state.textContent = `Created job ${row.name} (${row.job.job_id}).`;
    if (warnings.length > 0) state.textContent += ` Note: ${warnings.join(' ')}`;
  }

  createFailed(problem) {
    if (problem.status === 401) this.needAuth();
    showError($('#create-error'), `The job was not created: ${problem.message}`);
  }

  async cancel(row) {
    row.busy(true);
    try {
      this.show(await this.client.cancelJob(row.job.job_id));
      row.say('');
    } catch (problem) {
      if (problem.status === 401) this.needAuth();
      row.say(`Could not cancel: ${problem.message}`);
    }
    row.busy(false);
  }

  async delete(row) {
    const running = row.job.status === 'running';
    const yes = running
      ? await this.confirmForce(row)
      : await confirmDialog(
          `Delete ${row.name}?`,
          'The job, its event log and its results file are deleted. This cannot be undone.',
          'Delete the job',
        );
    if (!yes) return row.focus('.job-delete');
    await this.sendDelete(row, running);
  }

  confirmForce(row) {
    return confirmDialog(
      `${row.name} is still running`,
      'Deleting it now cancels its Gemini batch (requests already answered are lost), ' +
        'then deletes the job and its files.',
      'Cancel the batch and delete',
    );
  }

  async sendDelete(row, force) {
    row.busy(true);
    try {
      const answer = await this.client.deleteJob(row.job.job_id, { force });
      if (answer.status === 'deleted') {
        this.drop(row.job.job_id);
        $('#announcer').textContent = `Job ${row.name} deleted.`;
        $('#jobs-heading').focus();
        return;
      }
      // Forced: the service deletes the job once Gemini confirms the cancel.
      row.deleting = true;
      row.say('Deleting: cancelling the remote batch first…');
      this.waitUntilGone(row);
    } catch (problem) {
      if (problem.status === 400 && !force) {
        // It started running since the list was drawn: ask before forcing.
        row.busy(false);
        if (await this.confirmForce(row)) await this.sendDelete(row, true);
        return;
      }
      if (problem.status === 401) this.needAuth();
      row.say(`Could not delete: ${problem.message}`);
      row.busy(false);
    }
  }

  async waitUntilGone(row) {
    for (;;) {
      try {
        await this.client.jobStatus(row.job.job_id);
      } catch (problem) {
        if (problem.status === 404) {
          this.drop(row.job.job_id);
          $('#announcer').textContent = `Job ${row.name} deleted.`;
          $('#jobs-heading').focus();
          return;
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 500));
      if (!this.rows.has(row.job.job_id)) return;
    }
  }

  async download(row) {
    row.busy(true);
    try {
      const { blob, filename } = await this.client.downloadResults(row.job.job_id);
      const link = document.createElement('a');
      link.href = URL.createObjectURL(blob);
      link.download = filename;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
      row.say('');
    } catch (problem) {
      if (problem.status === 401) this.needAuth();
      row.say(`Could not download the results: ${problem.message}`);
    }
    row.busy(false);
  }
}

/** One job in the list: its element, its latest JobStatus, how it is followed. */
class Row {
  constructor(dashboard, job) {
    this.dashboard = dashboard;
    this.job = job;
    this.addedAt = Date.now();
    this.following = false;
    this.deleting = false;
    this.feed = null;
    this.stop = null;
    this.working = false; // an action of this row awaits the service
    this.el = $('#job-template').content.firstElementChild.cloneNode(true);
    this.el.dataset.jobId = job.job_id;
    const on = (selector, action) =>
      $(selector, this.el).addEventListener('click', () => {
        if (!this.working) action(this);
      });
    on('.job-cancel', (row) => dashboard.cancel(row));
    on('.job-delete', (row) => dashboard.delete(row));
    on('.job-download', (row) => dashboard.download(row));
    this.render();
  }

  get name() {
    return this.job.display_name || this.job.job_id;
  }

  get done() {
    return TERMINAL_STATUSES.includes(this.job.status);
  }

  /** A newer snapshot replaces the shown one; an older one (a list read that crossed a
   * stream event) is ignored. */
  update(job) {
    if ((job.updated_at ?? '') < (this.job.updated_at ?? '')) return;
    this.job = job;
    this.render();
  }

  setFeed(feed) {
    this.feed = feed;
    this.el.dataset.feed = feed;
  }

  render() {
    const job = this.job;
    const el = this.el;
    const percent = Math.round((job.progress ?? 0) * 1000) / 10;
    const step = job.current_step ?? '';
    el.dataset.status = job.status;
    el.dataset.step = step;
    el.dataset.progress = String(job.progress ?? 0);
    el.setAttribute('aria-label', `Job ${this.name}`);
    $('.job-name', el).textContent = this.name;
    $('.job-id', el).textContent = job.job_id;
    const badge = $('.badge', el);
    badge.textContent = job.status;
    badge.className = `badge status-${job.status}`;
    const bar = $('progress', el);
    bar.value = percent;
    bar.setAttribute('aria-label', `Progress of ${this.name}`);
    bar.setAttribute('aria-valuetext', `${percent}%, ${STEP_WORDS[step] ?? step}`);
    $('.job-percent', el).textContent = `${percent}%`;
    $('.job-step', el).textContent = this.stepText();
    // A finished job's message often repeats its error, which is shown in plain words.
    const message = job.message ?? '';
    const repeats = job.error && (message === job.error || message.endsWith(`: ${job.error}`));
    const messageEl = $('.job-message', el);
    messageEl.textContent = message;
    messageEl.hidden = !message || (this.done && (repeats || message === job.status));
    this.renderError();
    $('.job-created', el).replaceChildren(timeElement(job.created_at));
    $('.job-finished', el).replaceChildren(
      job.completed_at ? timeElement(job.completed_at) : document.createTextNode('not yet'),
    );
    $('.job-model', el).textContent = (job.model ?? '').replace(/^models\//, '');
    const actions = {
      '.job-download': job.status === 'completed',
      '.job-cancel': !this.done && step !== 'cancelling',
      '.job-delete': true,
    };
    for (const [selector, visible] of Object.entries(actions)) {
      const button = $(selector, el);
      // A focused button that goes away (Cancel, once cancelled) hands the keyboard focus
      // to Delete, which every row has, rather than dropping it to the page's start.
      const refocus = !visible && !button.hidden && document.activeElement === button;
      button.hidden = !visible;
      button.setAttribute('aria-label', `${button.textContent} ${this.name}`);
      if (refocus) $('.job-delete', el).focus();
    }
  }

  stepText() {
    const job = this.job;
    const step = job.current_step;
    const counts = job.requests;
    if (job.status === 'pending') {
      return job.attempts > 0 ? 'Waiting to try again' : 'Waiting for a free batch slot';
    }
    if (job.status === 'completed') return 'Completed';
    if (this.done) {
      const failed = job.status === 'failed';
      const at = job.error_details?.step ?? (failed ? step : null);
      const verb = failed ? 'Failed' : 'Cancelled';
      return at ? `${verb} at step: ${STEP_WORDS[at] ?? at}` : verb;
    }
    let text = STEP_WORDS[step] ?? step ?? '';
    if (counts && step === 'processing') {
      text += ` (${counts.succeeded + counts.failed} of ${counts.total} requests done)`;
    }
    return text;
  }

  renderError() {
    const job = this.job;
    const box = $('.job-error', this.el);
    const details = job.error_details ?? null;
    let words = null;
    let detail = '';
    if (job.status === 'failed') {
      words = `Failed: ${ERROR_WORDS[details?.class] ?? 'the job could not finish.'}`;
      detail = job.error ?? '';
    } else if (job.status === 'cancelled') {
      words = 'Cancelled: the job was stopped before it finished.';
      detail = job.error && job.error !== 'cancelled' ? job.error : '';
    } else if (details && !this.done) {
      words = `A try failed and will be retried: ${ERROR_WORDS[details.class] ?? ''}`;
      detail = details.message ?? '';
    }
    box.hidden = words === null;
    $('.job-error-words', this.el).textContent = words ?? '';
    const detailEl = $('.job-error-detail', this.el);
    detailEl.textContent = detail ? `Details: ${detail}` : '';
    detailEl.hidden = !detail;
  }

  /** A connection problem (ApiError), reconnecting (null), or none (undefined). */
  trouble(problem) {
    if (problem === undefined) {
      if (!this.deleting) this.say('');
      return;
    }
    if (problem?.status === 404) {
      this.dashboard.drop(this.job.job_id);
      return;
    }
    if (problem?.status === 401) this.dashboard.needAuth();
    this.say(problem ? `Live updates stopped: ${problem.message}` : 'Reconnecting…');
  }

  say(text) {
    const note = $('.job-trouble', this.el);
    note.textContent = text;
    note.hidden = !text;
  }

  /** While an action runs the row's buttons say they are unavailable (aria-disabled, not
   * disabled: a disabled button would drop the keyboard focus) and do nothing. */
  busy(yes) {
    this.working = yes;
    for (const button of this.el.querySelectorAll('button')) {
      if (yes) button.setAttribute('aria-disabled', 'true');
      else button.removeAttribute('aria-disabled');
    }
  }

  focus(selector) {
    $(selector, this.el)?.focus();
  }

  remove() {
    this.stop?.();
    this.el.remove();
  }
}

// -- helpers -----------------------------------------------------------------------------
/** The form's job options: the fields, over the JSON of "More options". */
function formOptions() {
  const text = $('#options-input').value.trim();
  let options = {};
  if (text) {
    try {
      options = JSON.parse(text);
    } catch (error) {
      throw new Error(`“More options” is not valid JSON: ${error.message}`);
    }
    if (options === null || typeof options !== 'object' || Array.isArray(options)) {
      throw new Error('“More options” must be a JSON object, like {"priority": 5}.');
    }
  }
  const model = $('#model-input').value.trim();
  const name = $('#name-input').value.trim();
  const priority = $('#priority-input').value.trim();
  const attempts = $('#attempts-input').value.trim();
  if (model) options.model = model;
  if (name) options.display_name = name;
  if (priority && Number(priority) !== 0) options.priority = Number(priority);
  if (attempts) {
    options.retry_config = { ...(options.retry_config ?? {}), max_attempts: Number(attempts) };
  }
  return options;
}

function showError(element, text) {
  element.textContent = text;
  element.hidden = false;
}

function timeElement(iso) {
  if (!iso) return document.createTextNode('—');
  const time = document.createElement('time');
  time.dateTime = iso;
  time.textContent = new Date(iso).toLocaleString();
  time.title = iso;
  return time;
}

/** A modal question; resolves true when the person confirms. The safe answer has the focus
 * and Escape means no. */
function confirmDialog(title, text, yesLabel) {
  const dialog = $('#confirm-dialog');
  $('#confirm-title').textContent = title;
  $('#confirm-text').textContent = text;
  $('#confirm-yes').textContent = yesLabel;
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'confirm'), {
      once: true,
    });
    dialog.showModal();
    $('#confirm-no').focus();
  });
}

export const dashboard = new Dashboard();
dashboard.start();
