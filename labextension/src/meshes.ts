import { ISignal, Signal } from '@lumino/signaling';

import {
  errorMessage,
  ILocalOptions,
  IMeshDetail,
  IMeshSummary,
  lossReason,
  normalizeAddress,
  pickSelection
} from './model';
import { jsonInit, requestAPI } from './request';

/**
 * An action on a mesh the server no longer has (stopped in another tab, its kernel
 * closed it, before the next poll took it off the list): said in the sidebar's words,
 * not the API's ("no mesh with id ...: list them with GET meshes").
 */
async function gone<T>(request: Promise<T>): Promise<T> {
  try {
    return await request;
  } catch (error) {
    const response = (error as { response?: Response }).response;
    if (response?.status === 404 && /^no mesh with id /.test(errorMessage(error))) {
      throw Object.assign(
        new Error(
          'this mesh is gone (stopped elsewhere, or its notebook closed it): ' +
            'pick a mesh in the list'
        ),
        { response }
      );
    }
    throw error;
  }
}

/**
 * The client-side state of the sidebar: the meshes, the selected one in full, what
 * is under way and the last error. Widgets render it; commands change it.
 */
export class MeshesModel {
  /** Emitted whenever anything the widgets show changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Emitted when the user selects another mesh. */
  get selectionChanged(): ISignal<this, string | null> {
    return this._selectionChanged;
  }

  meshes: IMeshSummary[] = [];
  detail: IMeshDetail | null = null;
  selected: string | null = null;
  /** loaded at least once */
  loaded = false;
  /** the server could not be reached or answered with an error on refresh */
  loadError: string | null = null;
  /** The HTTP status of the failed refresh's reply (null: no reply, or no failure). */
  loadStatus: number | null = null;
  /** the last action's failure, shown until the next action */
  actionError: string | null = null;
  /** the user picked a mesh in this session (a restored selection must not override it) */
  userSelected = false;
  /** an action under way, in words ("Starting a local mesh…") */
  pending: string | null = null;

  /** The selected mesh's summary, if any. */
  get current(): IMeshSummary | null {
    return this.meshes.find(m => m.id === this.selected) ?? null;
  }

  /**
   * Fetch the list and the selected mesh. Rejects on failure (so `Poll` backs off).
   * A reply that an action or a new selection overtook while it was on its way is
   * dropped: it would undo what the user just did. One sent while an action is under
   * way updates the list and the figures, and leaves the rest to the action.
   */
  async refresh(): Promise<void> {
    const generation = this._generation;
    try {
      const { meshes, server } = await requestAPI<{ meshes: IMeshSummary[]; server?: string }>(
        'meshes'
      );
      if (generation !== this._generation) {
        return;
      }
      // while an action of this sidebar is under way (a connect may take its whole
      // timeout) the list and the figures still change (another tab's start shows up,
      // as "starting"), but what the action decides is left to it: the selection, and
      // whether the mesh shown is gone (a mesh being stopped here leaves the server's
      // list before the stop returns, and was read as "stopped elsewhere")
      const acting = this._acting > 0;
      const shown = this.current;
      this.loadError = null;
      this.loadStatus = null;
      if (acting) {
        // the mesh shown stays listed, and the server run stays the one seen last,
        // until the action ends: the first poll after it says whether they are gone
        // (and the sidebar picks no other mesh by itself meanwhile)
        const kept = shown && !meshes.some(m => m.id === shown.id);
        this.meshes = kept ? [...meshes, shown] : meshes;
      } else {
        this.meshes = meshes;
        // another server run than the last reply's: what it had went with the old one
        const restarted = !!server && !!this._server && server !== this._server;
        this._server = server ?? this._server;
        if (shown && !meshes.some(m => m.id === shown.id)) {
          this._lost(shown, restarted);
        } else if (!this._noneAfterLoss) {
          this._setSelected(pickSelection(meshes, this.selected), false);
        }
      }
      const id = this.selected;
      if (acting && !(id && meshes.some(m => m.id === id))) {
        return; // (the selected mesh's figures, where the server still lists it)
      }
      const fetched = id ? await this._fetchDetail(id) : null;
      if (generation !== this._generation) {
        return;
      }
      if (acting) {
        if (fetched) {
          this.detail = fetched;
        }
        return;
      }
      this.detail = fetched;
      if (id && this.detail === null) {
        // the selected mesh went away between the two requests (stopped, or its
        // kernel shut down): not a server failure
        const gone = this.meshes.find(m => m.id === id);
        this.meshes = this.meshes.filter(m => m.id !== id);
        if (gone && shown?.id === id) {
          this._lost(gone); // the one the user was looking at
        } else {
          this._setSelected(pickSelection(this.meshes, null), false);
        }
      }
    } catch (error) {
      if (generation !== this._generation || this._acting > 0) {
        return;
      }
      this.loadError = errorMessage(error);
      this.loadStatus = (error as { response?: Response }).response?.status ?? null;
      throw error;
    } finally {
      this.loaded = true;
      this._changed.emit();
    }
  }

  /**
   * The mesh this sidebar showed is gone (stopped in another sidebar, its kernel
   * closed it): say so, and select none, so that no button acts on another mesh the
   * user did not pick.
   */
  private _lost(mesh: IMeshSummary, restarted = false): void {
    const others = this.meshes.length > 0;
    // until the user picks one (with none left, the next one comes selected)
    this._noneAfterLoss = others;
    this._setSelected(null, false);
    this.detail = null;
    this.actionError = this._lossNotice =
      `${mesh.name} is gone (${lossReason(mesh, restarted)}): ` +
      (others ? 'pick a mesh in the list' : 'start one, or connect to one');
  }

  /** The notice of a lost mesh is answered once the user has a mesh again. */
  private _clearLossNotice(): void {
    if (this._lossNotice !== null && this.actionError === this._lossNotice) {
      this.actionError = null;
    }
    this._lossNotice = null;
  }

  /** One mesh in full, or null when the server no longer has it (404). */
  private async _fetchDetail(id: string): Promise<IMeshDetail | null> {
    try {
      return await requestAPI<IMeshDetail>(`meshes/${encodeURIComponent(id)}`);
    } catch (error) {
      if ((error as { response?: Response }).response?.status === 404) {
        return null;
      }
      throw error;
    }
  }

  /** Say why an action was not sent (e.g. a bad count in a form). */
  fail(message: string): void {
    this.actionError = message;
    this._changed.emit();
  }

  /** Hide the last action's error. */
  dismissError(): void {
    this.actionError = null;
    this._changed.emit();
  }

  /** Select a mesh and load it in full at once (not at the next poll). */
  select(id: string | null): void {
    this.userSelected = true;
    this._generation++;
    this._setSelected(id, true);
    if (this.detail && this.detail.id !== id) {
      this.detail = null;
    }
    this._changed.emit();
    if (id !== null) {
      const generation = this._generation;
      void this._fetchDetail(id)
        .then(mesh => {
          if (generation === this._generation && this.selected === id && mesh) {
            this.detail = mesh;
            this._changed.emit();
          }
        })
        .catch(() => undefined); // the next poll says what went wrong
    }
  }

  /** Start a local mesh on the server and select it. */
  start(options: ILocalOptions): Promise<IMeshDetail | null> {
    return this._act('Starting a local mesh…', async () => {
      const mesh = await requestAPI<IMeshDetail>(
        'meshes',
        jsonInit('POST', options)
      );
      this._adopt(mesh);
      return mesh;
    });
  }

  /** Connect the server to a scheduler and select that mesh. */
  connect(address: string): Promise<IMeshDetail | null> {
    return this._act(`Connecting to ${address}…`, async () => {
      const mesh = await requestAPI<IMeshDetail>(
        'meshes/connect',
        jsonInit('POST', { address: normalizeAddress(address) })
      );
      this._adopt(mesh);
      return mesh;
    });
  }

  /** Set the number of workers per family of a mesh the server started. */
  scale(id: string, counts: Record<string, number>): Promise<IMeshDetail | null> {
    return this._act('Scaling…', async () => {
      const mesh = await gone(
        requestAPI<IMeshDetail>(`meshes/${encodeURIComponent(id)}`, jsonInit('PATCH', counts))
      );
      this._adopt(mesh);
      return mesh;
    });
  }

  /** Stop (or disconnect from) a mesh the server holds; `force`: even one that
   * notebooks use (the server refuses it otherwise, naming them). */
  stop(id: string, force = false): Promise<unknown> {
    return this._act('Stopping…', () => this._delete(id, force));
  }

  /** Stop a mesh unless notebooks use it: where the server refuses (409: a kernel
   * connected to it since the list was read), resolves to what the server said, for
   * the caller to ask and then `stop(id, true)`; null once it is stopped (or on
   * another error, shown as the action's error). */
  async stopUnlessUsed(id: string): Promise<string | null> {
    let inUse: string | null = null;
    await this._act('Stopping…', async () => {
      try {
        await this._delete(id, false);
      } catch (error) {
        if ((error as { response?: Response })?.response?.status === 409 &&
            / is in use by /.test(errorMessage(error))) {
          inUse = errorMessage(error);
          return;
        }
        throw error;
      }
    });
    return inUse;
  }

  private async _delete(id: string, force: boolean): Promise<void> {
    const query = force ? '?force=true' : '';
    await gone(requestAPI(`meshes/${encodeURIComponent(id)}${query}`, jsonInit('DELETE')));
    this.meshes = this.meshes.filter(m => m.id !== id);
    if (this.selected === id) {
      this.detail = null;
      this._setSelected(pickSelection(this.meshes, null), true);
    }
  }

  private async _act<T>(label: string, fn: () => Promise<T>): Promise<T | null> {
    // a refresh already on its way holds the state from before this action
    this._generation++;
    this._acting++;
    this.pending = label;
    this.actionError = null;
    this._changed.emit();
    try {
      return await fn();
    } catch (error) {
      this.actionError = errorMessage(error);
      return null;
    } finally {
      this._generation++; // nor may one sent while the action was under way
      this._acting--;
      this.pending = null;
      this._changed.emit();
    }
  }

  private _adopt(mesh: IMeshDetail): void {
    const i = this.meshes.findIndex(m => m.id === mesh.id);
    if (i >= 0) {
      this.meshes[i] = mesh;
    } else {
      this.meshes = [...this.meshes, mesh];
    }
    this.detail = mesh;
    this._setSelected(mesh.id, true);
  }

  private _setSelected(id: string | null, byUser: boolean): void {
    if (id !== null) {
      this._noneAfterLoss = false;
      this._clearLossNotice();
    }
    if (id === this.selected) {
      return;
    }
    this.selected = id;
    if (byUser || id !== null) {
      this._selectionChanged.emit(id);
    }
  }

  /** the mesh shown went away: no other is picked by itself until the user picks */
  private _noneAfterLoss = false;
  /** the server run the last list came from (its `server` id) */
  private _server: string | null = null;
  /** what the sidebar said of it (see _lost) */
  private _lossNotice: string | null = null;
  /** bumped by every action and selection: older refresh replies are dropped */
  private _generation = 0;
  /** actions under way (see `_act`) */
  private _acting = 0;
  private _changed = new Signal<this, void>(this);
  private _selectionChanged = new Signal<this, string | null>(this);
}
