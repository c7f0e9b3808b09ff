/**
 * The data of the Mesh sidebar and the pure logic over it (no JupyterLab imports, so
 * that it is unit-tested on its own).
 */

/** One device (Dask worker) of a mesh, as the server reports it. */
export interface IDevice {
  worker: string;
  name: string;
  kind: string;
  backend: string;
  model: string;
  memory: number;
  memory_used: number;
  site: string;
  nthreads: number;
  tasks: number;
  cpu_percent?: number;
  status?: string;
}

/** A kernel that uses a mesh. */
export interface IKernelInfo {
  pid: number;
  kernel_id: string | null;
  path: string | null;
}

export type Origin = 'sidebar' | 'connected' | 'kernel';
export type MeshStatus = 'running' | 'starting' | 'connecting' | 'scaling' | 'error';

/** A mesh in the list. */
export interface IMeshSummary {
  id: string;
  name: string;
  origin: Origin;
  address: string;
  dashboard: string | null;
  status: MeshStatus;
  error: string | null;
  can_scale: boolean;
  can_stop: boolean;
  counts: Record<string, number>;
  devices: number;
  kernels: IKernelInfo[];
  created: number;
  /** A kernel's mesh: whether that kernel started it (false: it connected to one). */
  kernel_started?: boolean | null;
}

/** Devices of one kind at one site. */
export interface IDeviceGroup {
  kind: string;
  site: string;
  devices: IDevice[];
  memory: number;
  memory_used: number;
  tasks: number;
}

/** One utilization sample of a whole mesh. */
export interface ISample {
  t: number;
  tasks: number;
  memory: number;
  memory_used: number;
  cpu: number | null;
  devices: number;
}

/** A router plan or report: one row per operation. */
export interface IPlanRecord {
  kind: 'plan' | 'report';
  route: string | null;
  at: number;
  title?: string;
  makespan?: number;
  wall_seconds?: number;
  rows: Array<Record<string, unknown>>;
  truncated?: boolean;
  /** the plan's notes: Dask's costs as measured on the mesh, ops placed off target */
  notes?: string[];
}

/** The selected mesh, in full. */
export interface IMeshDetail extends IMeshSummary {
  groups: IDeviceGroup[];
  history: ISample[];
  /** per worker: [time, cpu %, memory used, tasks] samples */
  device_history: Record<string, number[][]>;
  plans: IPlanRecord[];
  /** worker counts per family, for meshes this server may scale */
  scale: Record<string, number>;
}

/** Options of a local mesh (`POST meshes`). */
export interface ILocalOptions {
  cpu: number;
  jax_cpu: number;
  gpu: number | 'auto';
  tpu: number | 'auto';
  site: string;
}

/** What the sidebar remembers across reloads. */
export interface ISidebarState {
  selected: string | null;
  connectAddress: string;
}

export const DEFAULT_LOCAL: ILocalOptions = {
  cpu: 1,
  jax_cpu: 0,
  gpu: 'auto',
  tpu: 'auto',
  site: 'local'
};

/** Worker families a local mesh scales, in display order, with their labels. */
export const FAMILIES: ReadonlyArray<{ key: string; label: string }> = [
  { key: 'cpu', label: 'CPU' },
  { key: 'jax_cpu', label: 'CPU (JAX)' },
  { key: 'gpu', label: 'GPU' },
  { key: 'tpu', label: 'TPU' }
];

const KIND_ORDER = ['gpu', 'tpu', 'cpu'];
const SITE_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** A byte count for people: `1.5 GiB`; `-` when unknown. */
export function formatBytes(n: number | null | undefined): string {
  if (!n || n < 0 || !isFinite(n)) {
    return '-';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let i = 0;
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i++;
  }
  return i === 0 ? `${value.toFixed(0)} B` : `${value.toFixed(1)} ${units[i]}`;
}

/** Seconds for people: `850 µs`, `12 ms`, `3.2 s`, `4 min 5 s`. */
export function formatSeconds(s: unknown): string {
  if (typeof s !== 'number' || !isFinite(s)) {
    return '-';
  }
  if (s < 1e-3) {
    return `${(s * 1e6).toFixed(0)} µs`;
  }
  if (s < 1) {
    return `${(s * 1e3).toFixed(s < 0.01 ? 1 : 0)} ms`;
  }
  if (s < 60) {
    return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  }
  const m = Math.floor(s / 60);
  return `${m} min ${Math.round(s - m * 60)} s`;
}

/** `2 cpu, 1 gpu` from counts per kind; `no devices` when empty. */
export function countsSummary(counts: Record<string, number>): string {
  const kinds = Object.keys(counts)
    .filter(k => counts[k] > 0)
    .sort(kindCompare);
  if (kinds.length === 0) {
    return 'no devices';
  }
  return kinds.map(k => `${counts[k]} ${k}`).join(', ');
}

/** Accelerators first, then CPUs; unknown kinds last, alphabetically. */
export function kindCompare(a: string, b: string): number {
  const ia = KIND_ORDER.indexOf(a);
  const ib = KIND_ORDER.indexOf(b);
  const ra = ia < 0 ? KIND_ORDER.length : ia;
  const rb = ib < 0 ? KIND_ORDER.length : ib;
  return ra !== rb ? ra - rb : a.localeCompare(b);
}

/** Groups sorted by kind, then site. */
export function sortGroups(groups: IDeviceGroup[]): IDeviceGroup[] {
  return [...groups].sort(
    (a, b) => kindCompare(a.kind, b.kind) || a.site.localeCompare(b.site)
  );
}

/** The notebooks (or kernels) that use a mesh, as the server found them. */
export function kernelUsers(mesh: IMeshSummary): string[] {
  const names = (mesh.kernels ?? []).map(k =>
    k.path ? k.path : `a kernel (process ${k.pid})`
  );
  return [...new Set(names)].sort();
}

/**
 * Why a mesh the sidebar showed left the list, in words. `restarted`: the server's
 * list names another server run than before, so the mesh went with the old run (a
 * mesh the server started stopped with it, a connection ended, a kernel shut down).
 */
export function lossReason(mesh: IMeshSummary, restarted: boolean): string {
  if (!restarted) {
    return 'stopped elsewhere, or its kernel closed it';
  }
  switch (mesh.origin) {
    case 'sidebar':
      return 'the Jupyter server restarted, and the meshes it started stopped with it';
    case 'connected':
      return 'the Jupyter server restarted and dropped its connection; the mesh may still run: connect to it again';
    case 'kernel':
      return 'the Jupyter server restarted, and its kernel with it';
  }
  return 'the Jupyter server restarted';
}

/**
 * A server's refusal of a form's request, its field named as the form labels it
 * (`cpu must be…` → `CPU workers must be…`); other messages as they are.
 */
export function withLabels(message: string, labels: Record<string, string>): string {
  const field = /^([a-z_]+) must be /.exec(message)?.[1];
  if (field && labels[field]) {
    return labels[field] + message.slice(field.length);
  }
  // "... at least one device: keep cpu=1 or more": the field as the form names it
  return message.replace(/\b(?:use|keep) ([a-z_]+)=(\d+) or more\b/, (said, key, n) =>
    labels[key] ? `set ${labels[key]} to ${n} or more` : said
  );
}

/** The start form's fields by API key, as the form labels them. */
export const START_LABELS: Readonly<Record<string, string>> = {
  cpu: 'CPU workers',
  jax_cpu: 'JAX CPU workers',
  gpu: 'GPUs',
  tpu: 'TPUs',
  site: 'Site'
};

/** The scale form's fields by API key (a family), as the form labels them. */
export const SCALE_LABELS: Readonly<Record<string, string>> = Object.fromEntries(
  FAMILIES.map(f => [f.key, `${f.label} workers`])
);

/** How a mesh came to the sidebar, in words. */
export function originLabel(mesh: IMeshSummary): string {
  switch (mesh.origin) {
    case 'sidebar':
      return 'started here';
    case 'connected':
      return 'connected';
    case 'kernel':
      return mesh.kernel_started === false ? 'a kernel connected' : 'from a kernel';
  }
  return mesh.origin;
}

/** What the detail view says of a kernel's mesh: how to close it there. */
export function kernelHint(mesh: IMeshSummary): string | null {
  if (mesh.origin !== 'kernel') {
    return null;
  }
  if (mesh.kernel_started === false) {
    // (one that no longer answers does not run on: stopped here, or elsewhere)
    return mesh.error
      ? 'A kernel connected to this mesh, which does not answer: %mesh close there forgets it.'
      : 'A kernel connected to this mesh: %mesh close there disconnects it (the mesh runs on).';
  }
  return 'Started by a kernel: close it there with %mesh close.';
}

/** The fraction `used / total`, clamped to [0, 1]; 0 when the total is unknown. */
export function fraction(used: number, total: number): number {
  if (!total || total <= 0 || !isFinite(used)) {
    return 0;
  }
  return Math.max(0, Math.min(1, used / total));
}

/**
 * Parse a device count typed by the user.
 *
 * @returns the count, or `'auto'` where allowed
 * @throws Error saying what is allowed
 */
export function parseCount(
  name: string,
  text: string,
  allowAuto = false
): number | 'auto' {
  const value = text.trim().toLowerCase();
  if (allowAuto && (value === 'auto' || value === '')) {
    return 'auto';
  }
  if (!/^\d+$/.test(value)) {
    throw new Error(
      `${name} must be a whole number >= 0${allowAuto ? " or 'auto'" : ''}`
    );
  }
  const count = parseInt(value, 10);
  if (count > MAX_COUNT) {
    // (the server allows four workers per core; past this the number is a typo, and
    // past 2^53 JavaScript would send another one than was typed)
    throw new Error(`${name} must be at most ${MAX_COUNT}, not ${value}`);
  }
  return count;
}

/** The largest worker count a form sends (the server holds it to four per core). */
export const MAX_COUNT = 10000;

/**
 * The worker counts to change, from the scale form's text fields: only those that
 * differ from the mesh's `current` counts.
 *
 * @returns the counts (empty: nothing to change), or an error message for the first
 *   bad field (an empty field is not 0: that would stop every worker of the family)
 */
export function parseScale(
  fields: Record<string, string>,
  current: Record<string, number>
): { counts: Record<string, number> } | { error: string } {
  const counts: Record<string, number> = {};
  try {
    for (const [family, text] of Object.entries(fields)) {
      const n = parseCount(SCALE_LABELS[family] ?? family, text) as number;
      if ((current[family] ?? 0) !== n) {
        counts[family] = n;
      }
    }
  } catch (error) {
    return { error: (error as Error).message };
  }
  return { counts };
}

/**
 * Options of a local mesh from the form's text fields.
 *
 * @returns the options, or an error message for the first bad field
 */
export function parseLocalOptions(
  fields: Record<string, string>
): { options: ILocalOptions } | { error: string } {
  try {
    const options: ILocalOptions = {
      cpu: parseCount(START_LABELS.cpu, fields.cpu ?? '0') as number,
      jax_cpu: parseCount(START_LABELS.jax_cpu, fields.jax_cpu ?? '0') as number,
      gpu: parseCount(START_LABELS.gpu, fields.gpu ?? 'auto', true),
      tpu: parseCount(START_LABELS.tpu, fields.tpu ?? 'auto', true),
      site: (fields.site ?? 'local').trim() || 'local'
    };
    if (!SITE_RE.test(options.site)) {
      return {
        error:
          "site must be a name of letters, digits, '.', '_' or '-', like 'local' or " +
          "'edge-lab', starting with a letter or digit, at most 63 characters"
      };
    }
    if (
      options.cpu + options.jax_cpu === 0 &&
      options.gpu !== 'auto' &&
      options.tpu !== 'auto' &&
      options.gpu + options.tpu === 0
    ) {
      return { error: 'a mesh needs at least one device: use 1 CPU worker or more' };
    }
    return { options };
  } catch (error) {
    return { error: (error as Error).message };
  }
}

/** Local-mesh options from settings, falling back field by field to the defaults. */
export function localOptionsFromSettings(value: unknown): ILocalOptions {
  const out: ILocalOptions = { ...DEFAULT_LOCAL };
  if (!value || typeof value !== 'object') {
    return out;
  }
  const v = value as Record<string, unknown>;
  const count = (x: unknown): number | undefined =>
    typeof x === 'number' && Number.isInteger(x) && x >= 0 ? x : undefined;
  const countOrAuto = (x: unknown): number | 'auto' | undefined =>
    x === 'auto' ? 'auto' : count(x);
  out.cpu = count(v.cpu) ?? out.cpu;
  out.jax_cpu = count(v.jax_cpu) ?? out.jax_cpu;
  out.gpu = countOrAuto(v.gpu) ?? out.gpu;
  out.tpu = countOrAuto(v.tpu) ?? out.tpu;
  if (typeof v.site === 'string' && SITE_RE.test(v.site)) {
    out.site = v.site;
  }
  return out;
}

/**
 * Normalise a scheduler address as the server does: `host:port` means
 * `tcp://host:port`.
 *
 * @throws Error when it cannot be an address
 */
export function normalizeAddress(text: string): string {
  let address = text.trim();
  if (!address) {
    throw new Error('Type a scheduler address, like tcp://10.0.0.5:8786');
  }
  if (!address.includes('://')) {
    address = `tcp://${address}`;
  }
  const m = /^(tcp|tls|ws|wss):\/\/(\[[^\]]+\]|[^:/\s]+):(\d{1,5})$/.exec(address);
  if (!m || parseInt(m[3], 10) < 1 || parseInt(m[3], 10) > 65535) {
    throw new Error(
      `${text.trim()} is not an address: use tcp://HOST:PORT (or HOST:PORT)`
    );
  }
  return address;
}

/** The notebook cell that attaches a kernel to a mesh. */
/**
 * Whether a browser may open a link the server gave: an http(s) address or a path of
 * this server (a scheduler's `javascript:` link would run in JupyterLab's page).
 */
export function isSafeLink(url: string): boolean {
  if (url.startsWith('/') && !url.startsWith('//')) {
    return true;
  }
  try {
    const parsed = new URL(url);
    return (parsed.protocol === 'http:' || parsed.protocol === 'https:') && !!parsed.host;
  } catch {
    return false;
  }
}

export function connectSnippet(address: string): string {
  return `%load_ext jupyter_mesh\n%mesh connect ${address}`;
}

/** Keep the selection while that mesh exists, else select the first one (or none). */
export function pickSelection(
  meshes: IMeshSummary[],
  selected: string | null
): string | null {
  if (selected && meshes.some(m => m.id === selected)) {
    return selected;
  }
  return meshes.length > 0 ? meshes[0].id : null;
}

/**
 * The points of an SVG polyline for a series, scaled into `width` x `height`
 * (y grows downwards). `max` fixes the top of the scale (else the series' maximum).
 */
export function sparklinePoints(
  values: number[],
  width: number,
  height: number,
  max?: number
): string {
  const clean = values.map(v => (isFinite(v) ? v : 0));
  if (clean.length === 0) {
    return '';
  }
  const top = max ?? Math.max(...clean, 0);
  const scale = top > 0 ? height / top : 0;
  const step = clean.length > 1 ? width / (clean.length - 1) : 0;
  return clean
    .map((v, i) => {
      const x = clean.length > 1 ? i * step : width;
      const y = height - Math.min(v, top) * scale;
      return `${round2(x)},${round2(y)}`;
    })
    .join(' ');
}

function round2(x: number): number {
  return Math.round(x * 100) / 100;
}

/** Columns of a plan table: the known ones in order (the rest go into each row's tooltip). */
export function planColumns(rows: Array<Record<string, unknown>>): string[] {
  const known = ['op', 'target', 'tasks', 'est_seconds', 'seconds'];
  const present = new Set<string>();
  rows.forEach(r => Object.keys(r).forEach(k => present.add(k)));
  return known.filter(k => present.has(k));
}

const PLAN_HEADERS: Record<string, string> = {
  est_seconds: 'est.',
  seconds: 'measured',
  bytes_moved: 'moved'
};

/** The header of a plan column. */
export function planHeader(column: string): string {
  return PLAN_HEADERS[column] ?? column.replace(/_/g, ' ');
}

/** A row's other fields (class, bytes moved, backends, workers), for its tooltip. */
export function planRowTitle(row: Record<string, unknown>, shown: string[]): string {
  return Object.keys(row)
    .filter(k => !shown.includes(k))
    .map(k => `${planHeader(k)}: ${planCell(k, row[k])}`)
    .join('\n');
}

/** One cell of a plan table as text. */
export function planCell(column: string, value: unknown): string {
  if (value === null || value === undefined) {
    return '';
  }
  if (column.endsWith('seconds')) {
    return formatSeconds(value);
  }
  if (column.startsWith('bytes')) {
    return typeof value === 'number' && value > 0 ? formatBytes(value) : '0';
  }
  if (Array.isArray(value)) {
    return value.join(', ');
  }
  return String(value);
}

/** How a request that never reached the server begins to say so. */
export const UNREACHABLE = 'Could not reach the Jupyter server';

/** The text of any error for the sidebar's error banner. */
export function errorMessage(error: unknown): string {
  if ((error as { unreachable?: boolean } | null)?.unreachable) {
    // (a request that never reached the server: see request.ts)
    const why = error instanceof Error && error.message ? ` (${error.message})` : '';
    return `${UNREACHABLE}${why}: is it still running? Try again once it is back.`;
  }
  if (error instanceof Error) {
    return error.message || error.name;
  }
  if (typeof error === 'string') {
    return error;
  }
  return 'unknown error';
}

/**
 * What a failed refresh means, from the HTTP status of the reply (null: no reply at
 * all): a heading and what to do next.
 */
export function loadErrorHint(status: number | null): { title: string; hint: string } {
  if (status === null) {
    return {
      title: 'The Jupyter server did not answer. ',
      hint: 'Is it still running? Retrying with backoff.'
    };
  }
  if (status === 401) {
    return {
      title: 'The Jupyter server refused the request. ',
      hint: 'Your session may have ended: reload the page and log in again.'
    };
  }
  if (status === 403) {
    // signed in, but refused: the server's authorizer policy, or a stale page
    return {
      title: 'The Jupyter server forbade the request. ',
      hint:
        'Your account may not be allowed to use the Mesh API (ask whoever runs this ' +
        'server), or the page is stale: reload it.'
    };
  }
  if (status === 404) {
    return {
      title: 'The Mesh server extension did not answer. ',
      hint:
        "Check that jupyter_mesh is installed in the server's environment " +
        '(jupyter server extension list); retrying with backoff.'
    };
  }
  return {
    title: 'The Mesh server extension failed. ',
    hint: "The Jupyter server's log says why; retrying with backoff."
  };
}

/** A sidebar state read back from the state database, made safe. */
export function restoreState(value: unknown): ISidebarState {
  const state: ISidebarState = { selected: null, connectAddress: '' };
  if (value && typeof value === 'object') {
    const v = value as Record<string, unknown>;
    if (typeof v.selected === 'string') {
      state.selected = v.selected;
    }
    if (typeof v.connectAddress === 'string') {
      state.connectAddress = v.connectAddress;
    }
  }
  return state;
}

/**
 * The message of an HTTP error: the server extension's one line, or, for a reply that
 * is not its JSON (a proxy's page, or Jupyter's own 404 page when the extension is not
 * enabled), the status in words instead of the page's HTML.
 */
export function errorText(
  response: { status: number; statusText: string },
  data: unknown
): string {
  if (data && typeof data === 'object' && 'message' in data) {
    const message = (data as { message: unknown }).message;
    if (typeof message === 'string' && message) {
      return message;
    }
  }
  if (typeof data === 'string' && data && !/^\s*</.test(data)) {
    return data.split('\n')[0];
  }
  const what = `${response.status} ${response.statusText}`.trim();
  return response.status === 404
    ? `the server answered ${what}: is the jupyter_mesh server extension enabled? ` +
        '(jupyter server extension list)'
    : `the server answered ${what}`;
}

/** What the Devices section says where a mesh lists none. */
export function noDevicesHint(detail: IMeshDetail): string {
  switch (detail.status) {
    case 'starting':
      return 'Starting the mesh: its scheduler and workers…';
    case 'connecting':
      return 'Connecting to the scheduler…';
    case 'error':
      return 'The devices cannot be read (see the error above).';
  }
  return detail.can_scale
    ? 'No devices right now: a worker that died comes back in a few ' +
        'seconds (its nanny restarts it); else scale the mesh up.'
    : `No devices: start workers with jupyter-mesh worker ${detail.address}`;
}

/** The item a key moves to in a listbox of ``ids`` from ``current`` (null: the key does
 * not move, or there is nowhere to go). */
export function listboxMove(ids: string[], current: string, key: string): string | null {
  const at = ids.indexOf(current);
  if (at < 0 || ids.length === 0) {
    return null;
  }
  const to = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: ids.length - 1 }[key];
  if (to === undefined || to < 0 || to >= ids.length || to === at) {
    return null;
  }
  return ids[to];
}
