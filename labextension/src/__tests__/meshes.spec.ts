import { IMeshDetail, IMeshSummary, parseCount } from '../model';

const requestAPI = jest.fn();
jest.mock('../request', () => ({
  requestAPI: (...args: unknown[]) => requestAPI(...args),
  jsonInit: (method: string, body?: unknown) => ({
    method,
    body: body === undefined ? undefined : JSON.stringify(body)
  })
}));

// imported after the mock, so the model talks to the fake server
import { MeshesModel } from '../meshes';

function summary(id: string, extra: Partial<IMeshSummary> = {}): IMeshSummary {
  return {
    id,
    name: id,
    origin: 'sidebar',
    address: `tcp://127.0.0.1:${id.length}`,
    dashboard: null,
    status: 'running',
    error: null,
    can_scale: true,
    can_stop: true,
    counts: { cpu: 1 },
    devices: 1,
    kernels: [],
    created: 0,
    ...extra
  };
}

function detail(id: string): IMeshDetail {
  return {
    ...summary(id),
    groups: [],
    history: [],
    device_history: {},
    plans: [],
    scale: { cpu: 1 }
  };
}

/** A fake server: routes `METHOD path` to replies (functions may throw). */
function serve(routes: Record<string, unknown>): void {
  requestAPI.mockImplementation(async (path: string, init?: RequestInit) => {
    const key = `${init?.method ?? 'GET'} ${path}`;
    if (!(key in routes)) {
      throw new Error(`unexpected request ${key}`);
    }
    const reply = routes[key];
    return typeof reply === 'function' ? reply(init) : reply;
  });
}

beforeEach(() => requestAPI.mockReset());

describe('MeshesModel', () => {
  it('loads the list and the first mesh in full', async () => {
    serve({
      'GET meshes': { meshes: [summary('a'), summary('b')] },
      'GET meshes/a': detail('a')
    });
    const model = new MeshesModel();
    let changes = 0;
    model.changed.connect(() => changes++);
    await model.refresh();
    expect(model.loaded).toBe(true);
    expect(model.selected).toBe('a');
    expect(model.detail?.id).toBe('a');
    expect(model.loadError).toBeNull();
    expect(changes).toBe(1);
  });

  it('keeps a restored selection and forgets one that is gone', async () => {
    serve({
      'GET meshes': { meshes: [summary('a'), summary('b')] },
      'GET meshes/b': detail('b'),
      'GET meshes/a': detail('a')
    });
    const model = new MeshesModel();
    model.selected = 'b';
    await model.refresh();
    expect(model.detail?.id).toBe('b');
    model.selected = 'gone';
    await model.refresh();
    expect(model.selected).toBe('a');
  });

  it('shows no detail when there are no meshes', async () => {
    serve({ 'GET meshes': { meshes: [] } });
    const model = new MeshesModel();
    await model.refresh();
    expect(model.selected).toBeNull();
    expect(model.detail).toBeNull();
  });

  it('reports a failed refresh and rejects, so that the poll backs off', async () => {
    serve({
      'GET meshes': () => {
        throw new Error('server down');
      }
    });
    const model = new MeshesModel();
    await expect(model.refresh()).rejects.toThrow('server down');
    expect(model.loadError).toBe('server down');
    expect(model.loadStatus).toBeNull(); // no reply at all
    expect(model.loaded).toBe(true);
  });

  it('keeps the status of a reply that refused the refresh', async () => {
    serve({
      'GET meshes': () => {
        throw Object.assign(new Error('Forbidden'), { response: { status: 403 } });
      }
    });
    const model = new MeshesModel();
    await expect(model.refresh()).rejects.toThrow('Forbidden');
    expect(model.loadStatus).toBe(403);
  });

  it('starts a mesh, selects it and shows what is under way', async () => {
    const pending: Array<string | null> = [];
    serve({
      'POST meshes': (init: RequestInit) => {
        expect(JSON.parse(init.body as string)).toEqual({
          cpu: 1, jax_cpu: 0, gpu: 0, tpu: 0, site: 'local'
        });
        return detail('new');
      }
    });
    const model = new MeshesModel();
    const selections: Array<string | null> = [];
    model.selectionChanged.connect((_, id) => selections.push(id));
    model.changed.connect(() => pending.push(model.pending));
    const mesh = await model.start({ cpu: 1, jax_cpu: 0, gpu: 0, tpu: 0, site: 'local' });
    expect(mesh?.id).toBe('new');
    expect(model.meshes.map(m => m.id)).toEqual(['new']);
    expect(model.selected).toBe('new');
    expect(selections).toEqual(['new']);
    expect(pending).toEqual(['Starting a local mesh…', null]);
  });

  it('keeps the server message of a failed action', async () => {
    serve({
      'POST meshes': () => {
        throw new Error('no CUDA GPU found for gpu=2');
      }
    });
    const model = new MeshesModel();
    expect(await model.start({ cpu: 1, jax_cpu: 0, gpu: 2, tpu: 0, site: 'local' })).toBeNull();
    expect(model.actionError).toBe('no CUDA GPU found for gpu=2');
    expect(model.pending).toBeNull();
    model.dismissError();
    expect(model.actionError).toBeNull();
  });

  it('refuses a malformed address before asking the server', async () => {
    serve({});
    const model = new MeshesModel();
    expect(await model.connect('not an address')).toBeNull();
    expect(model.actionError).toContain('is not an address');
    expect(requestAPI).not.toHaveBeenCalled();
  });

  it('connects with a normalised address', async () => {
    serve({
      'POST meshes/connect': (init: RequestInit) => {
        expect(JSON.parse(init.body as string)).toEqual({ address: 'tcp://10.0.0.5:8786' });
        return detail('c');
      }
    });
    const model = new MeshesModel();
    expect((await model.connect('10.0.0.5:8786'))?.id).toBe('c');
  });

  it('scales and stops, then selects another mesh', async () => {
    serve({
      'GET meshes': { meshes: [summary('a'), summary('b')] },
      'GET meshes/a': detail('a'),
      'PATCH meshes/a': (init: RequestInit) => {
        expect(JSON.parse(init.body as string)).toEqual({ cpu: 2 });
        return { ...detail('a'), counts: { cpu: 2 }, scale: { cpu: 2 } };
      },
      'DELETE meshes/a': { id: 'a', stopped: true, disconnected: false }
    });
    const model = new MeshesModel();
    await model.refresh();
    await model.scale('a', { cpu: 2 });
    expect(model.current?.counts).toEqual({ cpu: 2 });
    await model.stop('a');
    expect(model.meshes.map(m => m.id)).toEqual(['b']);
    expect(model.selected).toBe('b');
    expect(model.detail).toBeNull();
  });

  it('stops a mesh that notebooks use only when told to force it', async () => {
    serve({
      'GET meshes': { meshes: [summary('a')] },
      'GET meshes/a': detail('a'),
      'DELETE meshes/a?force=true': { id: 'a', stopped: true, disconnected: false }
    });
    const model = new MeshesModel();
    await model.refresh();
    await model.stop('a', true);
    expect(requestAPI).toHaveBeenCalledWith('meshes/a?force=true', expect.anything());
    expect(model.meshes).toEqual([]);
  });

  it('says when the server refuses to stop a mesh that notebooks use', async () => {
    // a kernel connected since the list was read: the server's 409 comes back for the
    // sidebar to ask, not as an error
    const refused = Object.assign(
      new Error('Local mesh 1 is in use by a.ipynb: their kernels would lose it'),
      { response: { status: 409 } }
    );
    serve({
      'GET meshes': { meshes: [summary('a')] },
      'GET meshes/a': detail('a'),
      'DELETE meshes/a': () => {
        throw refused;
      }
    });
    const model = new MeshesModel();
    await model.refresh();
    expect(await model.stopUnlessUsed('a')).toBe(
      'Local mesh 1 is in use by a.ipynb: their kernels would lose it'
    );
    expect(model.actionError).toBeNull();
    expect(model.meshes.map(m => m.id)).toEqual(['a']);
    // another refusal is the action's error, as before
    serve({
      'GET meshes': { meshes: [summary('a')] },
      'DELETE meshes/a': () => {
        throw Object.assign(new Error('a is busy with another change'), {
          response: { status: 409 }
        });
      }
    });
    expect(await model.stopUnlessUsed('a')).toBeNull();
    expect(model.actionError).toBe('a is busy with another change');
  });

  it('lets a user selection win over a later restored one', () => {
    const model = new MeshesModel();
    expect(model.userSelected).toBe(false);
    model.select('x');
    expect(model.userSelected).toBe(true);
    expect(model.selected).toBe('x');
  });
  it('drops a poll that an action overtook', async () => {
    // a poll is on its way when Start finishes: its older list must not replace the
    // one with the new mesh, nor move the selection away from it
    let answerList: (v: unknown) => void = () => undefined;
    serve({
      'GET meshes': () => new Promise(resolve => (answerList = resolve)),
      'POST meshes': detail('new')
    });
    const model = new MeshesModel();
    const polling = model.refresh();
    await model.start({ cpu: 1, jax_cpu: 0, gpu: 0, tpu: 0, site: 'local' });
    answerList({ meshes: [summary('a')] });
    await polling;
    expect(model.meshes.map(m => m.id)).toEqual(['new']);
    expect(model.selected).toBe('new');
    expect(model.detail?.id).toBe('new');
  });

  it('does not call a mesh it stops itself "stopped elsewhere"', async () => {
    // the server drops the mesh from its list before the stop returns: a poll that
    // answered meanwhile read it as gone, and the banner blamed someone else
    let finishStop: (v: unknown) => void = () => undefined;
    serve({
      'GET meshes': { meshes: [summary('a')] },
      'GET meshes/a': detail('a'),
      'DELETE meshes/a': () => new Promise(resolve => (finishStop = resolve))
    });
    const model = new MeshesModel();
    await model.refresh();
    expect(model.selected).toBe('a');
    const stopping = model.stop('a');
    serve({
      'GET meshes': { meshes: [] },
      'DELETE meshes/a': () => new Promise(resolve => (finishStop = resolve))
    });
    await model.refresh(); // the poll, while the stop is under way
    finishStop({});
    await stopping;
    expect(model.actionError).toBeNull();
    expect(model.meshes).toEqual([]);
    await model.refresh();
    expect(model.actionError).toBeNull();
  });

  it('keeps the list and the figures live while an action is under way', async () => {
    // a connect may wait its whole timeout: every poll reply was dropped meanwhile, so
    // another tab's new mesh (listed as starting) and the load figures stood still
    let finishConnect: (v: unknown) => void = () => undefined;
    serve({
      'GET meshes': { meshes: [summary('a')] },
      'GET meshes/a': detail('a'),
      'POST meshes/connect': () => new Promise(resolve => (finishConnect = resolve))
    });
    const model = new MeshesModel();
    await model.refresh();
    const connecting = model.connect('tcp://127.0.0.1:9999');
    expect(model.pending).toMatch(/^Connecting to/);
    const busier = { ...detail('a'), devices: 2 };
    serve({
      'GET meshes': { meshes: [summary('a'), summary('b', { status: 'starting' })] },
      'GET meshes/a': busier,
      'POST meshes/connect': () => new Promise(resolve => (finishConnect = resolve))
    });
    await model.refresh(); // the poll, while the connect is under way
    expect(model.meshes.map(m => [m.id, m.status])).toEqual([
      ['a', 'running'],
      ['b', 'starting']
    ]);
    expect(model.detail?.devices).toBe(2);
    expect(model.selected).toBe('a'); // the action decides what is selected
    expect(model.pending).toMatch(/^Connecting to/);
    finishConnect(detail('c'));
    await connecting;
    expect(model.meshes.map(m => m.id)).toEqual(['a', 'b', 'c']);
    expect(model.selected).toBe('c');
  });

  it('says in its own words that a mesh acted on is gone', async () => {
    // stopped in another tab before the next poll: the API's words were shown, "no mesh
    // with id 'a': list them with GET meshes"
    const notFound = () => {
      throw Object.assign(new Error("no mesh with id 'a': list them with GET meshes"), {
        response: { status: 404 }
      });
    };
    serve({
      'GET meshes': { meshes: [summary('a')] },
      'GET meshes/a': detail('a'),
      'PATCH meshes/a': notFound,
      'DELETE meshes/a': notFound
    });
    const model = new MeshesModel();
    await model.refresh();
    const said =
      'this mesh is gone (stopped elsewhere, or its notebook closed it): pick a mesh in ' +
      'the list';
    expect(await model.scale('a', { cpu: 2 })).toBeNull();
    expect(model.actionError).toBe(said);
    model.dismissError();
    await model.stop('a');
    expect(model.actionError).toBe(said);
  });

  it('says a mesh lost while an action runs once the action ends', async () => {
    // the poll during the action took the mesh off the list: the next one found
    // nothing missing, said nothing, and picked another mesh by itself
    serve({
      'GET meshes': { meshes: [summary('a'), summary('b')], server: 'run1' },
      'GET meshes/a': detail('a'),
      'GET meshes/b': detail('b')
    });
    const model = new MeshesModel();
    await model.refresh();
    let failStart: (e: unknown) => void = () => undefined;
    serve({
      'GET meshes': { meshes: [summary('b')], server: 'run1' }, // a stopped elsewhere
      'GET meshes/b': detail('b'),
      'POST meshes': () => new Promise((_, reject) => (failStart = reject))
    });
    const starting = model.start({ cpu: 1, jax_cpu: 0, gpu: 0, tpu: 0, site: 'local' });
    await model.refresh(); // the poll, while the start is under way
    expect(model.selected).toBe('a');
    failStart(Object.assign(new Error('no room'), { response: { status: 409 } }));
    await starting;
    await model.refresh();
    expect(model.selected).toBeNull(); // nothing the user did not pick
    expect(model.actionError).toMatch(/^a is gone \(/);
  });

  it('says a server restart first seen while an action runs', async () => {
    serve({
      'GET meshes': { meshes: [summary('a', { origin: 'connected' })], server: 'run1' },
      'GET meshes/a': detail('a')
    });
    const model = new MeshesModel();
    await model.refresh();
    let failConnect: (e: unknown) => void = () => undefined;
    serve({
      'GET meshes': { meshes: [], server: 'run2' },
      'POST meshes/connect': () => new Promise((_, reject) => (failConnect = reject))
    });
    const connecting = model.connect('tcp://10.0.0.1:8786');
    await model.refresh(); // the poll, while the connect is under way
    failConnect(Object.assign(new Error('timed out'), { response: { status: 504 } }));
    await connecting;
    await model.refresh();
    expect(model.actionError).toMatch(/restarted/);
  });

  it('never shows one mesh in full while another is selected', async () => {
    let answerA: (v: unknown) => void = () => undefined;
    serve({
      'GET meshes': { meshes: [summary('a'), summary('b')] },
      'GET meshes/a': () => new Promise(resolve => (answerA = resolve)),
      'GET meshes/b': detail('b')
    });
    const model = new MeshesModel();
    const polling = model.refresh();
    await new Promise(resolve => setTimeout(resolve, 0));
    model.select('b'); // the user picks b while a's details are on their way
    answerA(detail('a'));
    await polling;
    await new Promise(resolve => setTimeout(resolve, 0));
    expect(model.selected).toBe('b');
    expect(model.detail?.id).toBe('b'); // loaded at once on selection
  });

  it('re-picks, without an error, when the selected mesh vanished meanwhile', async () => {
    const gone = Object.assign(new Error("no mesh with id 'a'"), {
      response: { status: 404 }
    });
    serve({
      'GET meshes': { meshes: [summary('a'), summary('b')] },
      'GET meshes/a': () => {
        throw gone;
      }
    });
    const model = new MeshesModel();
    await model.refresh(); // resolves: the poll must not back off
    expect(model.loadError).toBeNull();
    expect(model.meshes.map(m => m.id)).toEqual(['b']);
    expect(model.selected).toBe('b');
  });

  it('says so when the mesh it showed is gone, and picks no other by itself', async () => {
    // stopped in another sidebar: the buttons must not act on another mesh unasked
    serve({
      'GET meshes': { meshes: [summary('a', { name: 'Local mesh 3' }), summary('b')] },
      'GET meshes/a': detail('a')
    });
    const model = new MeshesModel();
    await model.refresh();
    expect(model.selected).toBe('a');
    serve({ 'GET meshes': { meshes: [summary('b')] }, 'GET meshes/b': detail('b') });
    await model.refresh();
    expect(model.selected).toBeNull();
    expect(model.detail).toBeNull();
    expect(model.actionError).toBe(
      'Local mesh 3 is gone (stopped elsewhere, or its kernel closed it): pick a mesh in the list'
    );
    await model.refresh(); // the next poll picks none either
    expect(model.selected).toBeNull();
    model.select('b');
    await new Promise(resolve => setTimeout(resolve, 0));
    expect(model.detail?.id).toBe('b');
    expect(model.actionError).toBeNull(); // answered: the user has a mesh again
    await model.refresh();
    expect(model.selected).toBe('b');
    // the last one goes: nothing to pick from, and the next mesh comes selected
    serve({ 'GET meshes': { meshes: [] } });
    await model.refresh();
    expect(model.actionError).toBe(
      'b is gone (stopped elsewhere, or its kernel closed it): start one, or connect to one'
    );
    serve({ 'GET meshes': { meshes: [summary('c')] }, 'GET meshes/c': detail('c') });
    await model.refresh();
    expect(model.selected).toBe('c');
    expect(model.actionError).toBeNull();
  });

  it('says the server restarted when the list comes from another server run', async () => {
    serve({
      'GET meshes': { meshes: [summary('a', { name: 'Local mesh 1' }), summary('b')], server: 'run1' },
      'GET meshes/a': detail('a')
    });
    const model = new MeshesModel();
    await model.refresh();
    // the same run, the mesh still listed: nothing to say
    serve({ 'GET meshes': { meshes: [summary('a', { name: 'Local mesh 1' })], server: 'run1' },
      'GET meshes/a': detail('a') });
    await model.refresh();
    expect(model.selected).toBe('a');
    expect(model.actionError).toBeNull();
    // a new run: the mesh it started stopped with the old one
    serve({ 'GET meshes': { meshes: [summary('c')], server: 'run2' }, 'GET meshes/c': detail('c') });
    await model.refresh();
    expect(model.selected).toBeNull();
    expect(model.actionError).toBe(
      'Local mesh 1 is gone (the Jupyter server restarted, and the meshes it started ' +
        'stopped with it): pick a mesh in the list'
    );
  });

  it('refuses counts past what a form may send', () => {
    expect(() => parseCount('cpu', '99999999999999999999')).toThrow(
      'cpu must be at most 10000, not 99999999999999999999'
    );
  });

  it('says why a form was not sent', () => {
    const model = new MeshesModel();
    model.fail('cpu must be a whole number >= 0');
    expect(model.actionError).toBe('cpu must be a whole number >= 0');
  });
});
