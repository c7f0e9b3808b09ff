import {
  connectSnippet,
  countsSummary,
  DEFAULT_LOCAL,
  errorMessage,
  errorText,
  formatBytes,
  formatSeconds,
  fraction,
  IDeviceGroup,
  IMeshDetail,
  IMeshSummary,
  isSafeLink,
  kernelHint,
  kernelUsers,
  originLabel,
  listboxMove,
  loadErrorHint,
  localOptionsFromSettings,
  noDevicesHint,
  normalizeAddress,
  parseCount,
  parseLocalOptions,
  parseScale,
  lossReason,
  SCALE_LABELS,
  START_LABELS,
  withLabels,
  pickSelection,
  planCell,
  planColumns,
  planHeader,
  planRowTitle,
  restoreState,
  sortGroups,
  sparklinePoints
} from '../model';

function mesh(id: string, extra: Partial<IMeshSummary> = {}): IMeshSummary {
  return {
    id,
    name: id,
    origin: 'sidebar',
    address: 'tcp://127.0.0.1:1',
    dashboard: null,
    status: 'running',
    error: null,
    can_scale: true,
    can_stop: true,
    counts: {},
    devices: 0,
    kernels: [],
    created: 0,
    ...extra
  };
}

describe('loadErrorHint', () => {
  it('blames the extension only where the server said it has no such route', () => {
    expect(loadErrorHint(null).title).toContain('Jupyter server did not answer');
    expect(loadErrorHint(401).hint).toContain('log in again');
    // signed in but refused: a policy says no, which logging in again does not mend
    expect(loadErrorHint(403).hint).toContain('may not be allowed to use the Mesh API');
    expect(loadErrorHint(403).hint).not.toContain('log in');
    expect(loadErrorHint(401).hint).toContain('log in again');
    expect(loadErrorHint(404).hint).toContain('jupyter server extension list');
    expect(loadErrorHint(500).hint).toContain("server's log");
  });
});

describe('kernelUsers', () => {
  it('names the notebooks that use a mesh, once each, or their kernel process', () => {
    expect(kernelUsers(mesh('a'))).toEqual([]);
    const used = mesh('a', {
      kernels: [
        { pid: 7, kernel_id: 'k2', path: 'b.ipynb' },
        { pid: 8, kernel_id: 'k1', path: 'a.ipynb' },
        { pid: 9, kernel_id: 'k3', path: 'b.ipynb' },
        { pid: 10, kernel_id: null, path: null }
      ]
    });
    expect(kernelUsers(used)).toEqual(['a kernel (process 10)', 'a.ipynb', 'b.ipynb']);
  });
});

describe('kernel meshes', () => {
  it('say whether the kernel started the mesh or connected to it', () => {
    const started = mesh('k1', { origin: 'kernel', kernel_started: true });
    const connected = mesh('k2', { origin: 'kernel', kernel_started: false });
    expect(originLabel(started)).toBe('from a kernel');
    expect(originLabel(connected)).toBe('a kernel connected');
    expect(kernelHint(started)).toBe('Started by a kernel: close it there with %mesh close.');
    expect(kernelHint(connected)).toContain('%mesh close there disconnects it');
    // a mesh stopped since (here, or elsewhere) does not "run on"
    const dead = mesh('k4', { origin: 'kernel', kernel_started: false, error: 'gone' });
    expect(kernelHint(dead)).toBe(
      'A kernel connected to this mesh, which does not answer: %mesh close there forgets it.'
    );
    // an older server that does not say: as before
    expect(originLabel(mesh('k3', { origin: 'kernel' }))).toBe('from a kernel');
    expect(kernelHint(mesh('s', { origin: 'sidebar' }))).toBeNull();
  });
});

describe('formatting', () => {
  it('formats bytes in binary units', () => {
    expect(formatBytes(0)).toBe('-');
    expect(formatBytes(undefined)).toBe('-');
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(25 * 1024 ** 3)).toBe('25.0 GiB');
  });

  it('formats seconds at every scale', () => {
    expect(formatSeconds(2e-5)).toBe('20 µs');
    expect(formatSeconds(0.0042)).toBe('4.2 ms');
    expect(formatSeconds(0.25)).toBe('250 ms');
    expect(formatSeconds(3.14159)).toBe('3.14 s');
    expect(formatSeconds(125)).toBe('2 min 5 s');
    expect(formatSeconds('x')).toBe('-');
    expect(formatSeconds(NaN)).toBe('-');
  });

  it('summarises device counts, accelerators first', () => {
    expect(countsSummary({})).toBe('no devices');
    expect(countsSummary({ cpu: 2, gpu: 1, tpu: 0 })).toBe('1 gpu, 2 cpu');
  });

  it('clamps fractions', () => {
    expect(fraction(5, 10)).toBe(0.5);
    expect(fraction(20, 10)).toBe(1);
    expect(fraction(5, 0)).toBe(0);
  });

  it('sorts device groups by kind then site', () => {
    const g = (kind: string, site: string): IDeviceGroup => ({
      kind, site, devices: [], memory: 0, memory_used: 0, tasks: 0
    });
    const sorted = sortGroups([g('cpu', 'b'), g('cpu', 'a'), g('tpu', 'x'), g('gpu', 'z')]);
    expect(sorted.map(x => `${x.kind}@${x.site}`)).toEqual([
      'gpu@z', 'tpu@x', 'cpu@a', 'cpu@b'
    ]);
  });
});

describe('local mesh options', () => {
  it('parses counts and auto', () => {
    expect(parseCount('cpu', ' 3 ')).toBe(3);
    expect(parseCount('gpu', 'AUTO', true)).toBe('auto');
    expect(() => parseCount('cpu', '-1')).toThrow('cpu must be a whole number >= 0');
    expect(() => parseCount('cpu', 'auto')).toThrow('>= 0');
    expect(() => parseCount('gpu', '1.5', true)).toThrow("or 'auto'");
  });

  it('turns the form into options or one error', () => {
    expect(
      parseLocalOptions({ cpu: '1', jax_cpu: '0', gpu: '0', tpu: 'auto', site: 'lab' })
    ).toEqual({ options: { cpu: 1, jax_cpu: 0, gpu: 0, tpu: 'auto', site: 'lab' } });
    expect(parseLocalOptions({ cpu: 'x' })).toEqual({
      error: 'CPU workers must be a whole number >= 0'
    });
    expect(parseLocalOptions({ cpu: '1', site: 'no spaces' })).toHaveProperty('error');
    expect(
      parseLocalOptions({ cpu: '0', jax_cpu: '0', gpu: '0', tpu: '0', site: 'x' })
    ).toEqual({ error: 'a mesh needs at least one device: use 1 CPU worker or more' });
  });

  it('reads settings field by field', () => {
    expect(localOptionsFromSettings(undefined)).toEqual(DEFAULT_LOCAL);
    expect(localOptionsFromSettings({ cpu: 4, gpu: 2, tpu: 'auto', site: 'edge' })).toEqual({
      ...DEFAULT_LOCAL, cpu: 4, gpu: 2, site: 'edge'
    });
    expect(localOptionsFromSettings({ cpu: -1, gpu: 'many', site: '' })).toEqual(DEFAULT_LOCAL);
  });
});

describe('addresses and snippets', () => {
  it('normalises scheduler addresses like the server', () => {
    expect(normalizeAddress('10.0.0.5:8786')).toBe('tcp://10.0.0.5:8786');
    expect(normalizeAddress(' tls://sched.example:8786 ')).toBe('tls://sched.example:8786');
    expect(normalizeAddress('tcp://[::1]:8786')).toBe('tcp://[::1]:8786');
    expect(() => normalizeAddress('')).toThrow('Type a scheduler address');
    expect(() => normalizeAddress('http://x:1')).toThrow('is not an address');
    expect(() => normalizeAddress('host')).toThrow('is not an address');
    expect(() => normalizeAddress('host:99999')).toThrow('is not an address');
  });

  it('opens only http(s) links and paths of this server', () => {
    expect(isSafeLink('http://127.0.0.1:8787/status')).toBe(true);
    expect(isSafeLink('https://hub.example/user/ada/proxy/8787/status')).toBe(true);
    expect(isSafeLink('/user/ada/proxy/8787/status')).toBe(true);
    expect(isSafeLink('javascript:alert(1)')).toBe(false);
    expect(isSafeLink('JavaScript:alert(1)')).toBe(false);
    expect(isSafeLink('data:text/html,hi')).toBe(false);
    expect(isSafeLink('//evil.example/x')).toBe(false);
    expect(isSafeLink('')).toBe(false);
  });

  it('writes the connection snippet', () => {
    expect(connectSnippet('tcp://10.0.0.5:8786')).toBe(
      '%load_ext jupyter_mesh\n%mesh connect tcp://10.0.0.5:8786'
    );
  });
});

describe('listboxMove', () => {
  it('moves with the arrows, Home and End, and stays at the ends', () => {
    const ids = ['a', 'b', 'c'];
    expect(listboxMove(ids, 'a', 'ArrowDown')).toBe('b');
    expect(listboxMove(ids, 'b', 'ArrowUp')).toBe('a');
    expect(listboxMove(ids, 'c', 'ArrowDown')).toBeNull();
    expect(listboxMove(ids, 'a', 'ArrowUp')).toBeNull();
    expect(listboxMove(ids, 'b', 'Home')).toBe('a');
    expect(listboxMove(ids, 'a', 'End')).toBe('c');
    expect(listboxMove(ids, 'a', 'Tab')).toBeNull();
    expect(listboxMove(ids, 'gone', 'ArrowDown')).toBeNull();
  });
});

describe('noDevicesHint', () => {
  const detail = (extra: Partial<IMeshDetail>): IMeshDetail => ({
    ...mesh('m'),
    groups: [],
    history: [],
    device_history: {},
    plans: [],
    scale: {},
    ...extra
  });

  it('says a mesh is starting, connecting or unreadable before saying it has no devices', () => {
    expect(noDevicesHint(detail({ status: 'starting', address: '', can_stop: false }))).toBe(
      'Starting the mesh: its scheduler and workers…'
    );
    expect(noDevicesHint(detail({ status: 'connecting' }))).toBe('Connecting to the scheduler…');
    expect(noDevicesHint(detail({ status: 'error' }))).toMatch(/cannot be read/);
    expect(noDevicesHint(detail({}))).toMatch(/nanny restarts it/);
    expect(noDevicesHint(detail({ can_scale: false }))).toBe(
      'No devices: start workers with jupyter-mesh worker tcp://127.0.0.1:1'
    );
  });
});

describe('selection and state', () => {
  it('keeps a live selection, else takes the first mesh', () => {
    const meshes = [mesh('a'), mesh('b')];
    expect(pickSelection(meshes, 'b')).toBe('b');
    expect(pickSelection(meshes, 'gone')).toBe('a');
    expect(pickSelection(meshes, null)).toBe('a');
    expect(pickSelection([], 'a')).toBeNull();
  });

  it('restores only well-formed state', () => {
    expect(restoreState({ selected: 'local-1', connectAddress: 'tcp://h:1' })).toEqual({
      selected: 'local-1', connectAddress: 'tcp://h:1'
    });
    expect(restoreState({ selected: 3 })).toEqual({ selected: null, connectAddress: '' });
    expect(restoreState(undefined)).toEqual({ selected: null, connectAddress: '' });
  });

  it('turns anything thrown into a message', () => {
    expect(errorMessage(new Error('boom'))).toBe('boom');
    expect(errorMessage('plain')).toBe('plain');
    expect(errorMessage(42)).toBe('unknown error');
    // a request that never reached the server (request.ts marks it) says so
    const down = Object.assign(new TypeError('Failed to fetch'), { unreachable: true });
    expect(errorMessage(down)).toBe(
      'Could not reach the Jupyter server (Failed to fetch): is it still running? Try ' +
        'again once it is back.'
    );
    // any other TypeError is said as it is
    expect(errorMessage(new TypeError('x is undefined'))).toBe('x is undefined');
  });
});

describe('charts and plans', () => {
  it('scales a sparkline into its box', () => {
    expect(sparklinePoints([], 100, 10)).toBe('');
    expect(sparklinePoints([0, 5, 10], 100, 10)).toBe('0,10 50,5 100,0');
    expect(sparklinePoints([50], 100, 10, 100)).toBe('100,5');
    expect(sparklinePoints([200, 0], 10, 10, 100)).toBe('0,0 10,10');
  });

  it('shows the known plan columns in order', () => {
    const rows = [
      { seconds: 0.2, op: 'matmul', tasks: 4, target: 'gpu', est_seconds: 0.1, class: 'matmul' }
    ];
    expect(planColumns(rows)).toEqual(['op', 'target', 'tasks', 'est_seconds', 'seconds']);
    expect(planCell('est_seconds', 0.1)).toBe('100 ms');
    expect(planCell('bytes_moved', 2048)).toBe('2.0 KiB');
    expect(planCell('bytes_moved', 0)).toBe('0');
    expect(planCell('backends', ['cupy', 'numpy'])).toBe('cupy, numpy');
    expect(planCell('op', null)).toBe('');
    expect(planHeader('seconds')).toBe('measured');
    expect(planHeader('bytes_moved')).toBe('moved');
    expect(planRowTitle({ op: 'a', bytes_moved: 2048, backends: ['numpy'] }, ['op'])).toBe(
      'moved: 2.0 KiB\nbackends: numpy'
    );
  });
});

describe('parseScale', () => {
  it('sends only the counts that change', () => {
    expect(parseScale({ cpu: '3', gpu: '0' }, { cpu: 1, gpu: 0 })).toEqual({
      counts: { cpu: 3 }
    });
    expect(parseScale({ cpu: '1' }, { cpu: 1 })).toEqual({ counts: {} });
  });

  it('never reads an empty or bad field as 0 (that would stop every worker)', () => {
    for (const text of ['', 'abc', '-1', '1.5']) {
      const parsed = parseScale({ cpu: text }, { cpu: 2 });
      expect(parsed).toEqual({ error: 'CPU workers must be a whole number >= 0' });
    }
  });
});

describe('withLabels', () => {
  it("names a refused field as the form labels it, not by the API's key", () => {
    const server = 'cpu must be a whole number from 0 to 8 (four per core here), not 20';
    expect(withLabels(server, START_LABELS)).toBe(
      'CPU workers must be a whole number from 0 to 8 (four per core here), not 20'
    );
    expect(withLabels('jax_cpu must be a whole number from 0 to 8', SCALE_LABELS)).toBe(
      'CPU (JAX) workers must be a whole number from 0 to 8'
    );
    expect(withLabels('jax_cpu must be x', START_LABELS)).toBe('JAX CPU workers must be x');
  });

  it('names the field the server asks to keep, as the form labels it', () => {
    // scaling every family to 0: "keep cpu=1", which the form calls CPU workers
    expect(
      withLabels('a mesh needs at least one device: keep cpu=1 or more', SCALE_LABELS)
    ).toBe('a mesh needs at least one device: set CPU workers to 1 or more');
    expect(
      withLabels('a mesh needs at least one device: use cpu=1 or more', START_LABELS)
    ).toBe('a mesh needs at least one device: set CPU workers to 1 or more');
    expect(withLabels('keep nodes=1 or more', START_LABELS)).toBe('keep nodes=1 or more');
  });

  it('leaves any other message as it is', () => {
    for (const message of [
      'the meshes started here would have 9 worker processes: ask for fewer workers',
      'threads_per_worker must be 1 or more', // no field of the form
      'a cpu must be' // a key not at the start
    ]) {
      expect(withLabels(message, START_LABELS)).toBe(message);
    }
  });
});

describe('lossReason', () => {
  it('says the server restarted only when it did, by how the mesh came', () => {
    const m = (origin: 'sidebar' | 'connected' | 'kernel') => mesh('a', { origin });
    expect(lossReason(m('sidebar'), false)).toBe('stopped elsewhere, or its kernel closed it');
    expect(lossReason(m('sidebar'), true)).toMatch(/server restarted.*stopped with it/);
    expect(lossReason(m('connected'), true)).toMatch(/may still run: connect to it again/);
    expect(lossReason(m('kernel'), true)).toMatch(/its kernel with it/);
  });
});

describe('errorText', () => {
  it("gives the server extension's one line", () => {
    expect(errorText({ status: 400, statusText: 'Bad Request' }, { message: 'cpu must be' }))
      .toBe('cpu must be');
  });

  it("never shows a page's HTML", () => {
    const page = '<!DOCTYPE html>\n<html><body>404 : Not Found</body></html>';
    expect(errorText({ status: 404, statusText: 'Not Found' }, page)).toBe(
      'the server answered 404 Not Found: is the jupyter_mesh server extension ' +
        'enabled? (jupyter server extension list)'
    );
    expect(errorText({ status: 502, statusText: 'Bad Gateway' }, '<html></html>')).toBe(
      'the server answered 502 Bad Gateway'
    );
    expect(errorText({ status: 500, statusText: '' }, 'plain text\nmore')).toBe('plain text');
  });
});
