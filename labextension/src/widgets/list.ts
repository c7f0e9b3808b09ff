import { Widget } from '@lumino/widgets';

import { countsSummary, IMeshSummary, kernelUsers, listboxMove, originLabel } from '../model';
import { MeshesModel } from '../meshes';
import { h, replaceChildren, rerender } from './dom';

export namespace MeshListWidget {
  export interface IOptions {
    model: MeshesModel;
  }
}

/** The meshes this server knows; click one to select it. */
export class MeshListWidget extends Widget {
  constructor(options: MeshListWidget.IOptions) {
    super();
    this.model = options.model;
    this.addClass('jp-Mesh-list');
    this.model.changed.connect(this.render, this);
    this.render();
  }

  readonly model: MeshesModel;

  render(): void {
    const { meshes, loaded, loadError } = this.model;
    if (!loaded) {
      replaceChildren(this.node, h('div', { class: 'jp-Mesh-hint' }, 'Loading meshes…'));
      return;
    }
    if (meshes.length === 0) {
      replaceChildren(
        this.node,
        loadError
          ? null
          : h(
              'div',
              { class: 'jp-Mesh-empty' },
              h('p', {}, h('b', {}, 'No mesh yet.')),
              h(
                'p',
                {},
                'Start a local mesh below, connect to a Dask scheduler, or run ',
                h('code', {}, '%load_ext jupyter_mesh'),
                ' and ',
                h('code', {}, '%mesh start'),
                ' in a notebook: kernel meshes appear here by themselves.'
              )
            )
      );
      return;
    }
    rerender(
      this.node,
      h(
        'ul',
        { class: 'jp-Mesh-meshItems', role: 'listbox', 'aria-label': 'Meshes' },
        ...meshes.map(m => this._item(m))
      )
    );
  }

  private _hasSelection(): boolean {
    return this.model.meshes.some(m => m.id === this.model.selected);
  }

  private _item(mesh: IMeshSummary): HTMLElement {
    const selected = mesh.id === this.model.selected;
    // every kernel, with or without a notebook path (as the stop dialog names them)
    const kernelPaths = kernelUsers(mesh);
    return h(
      'li',
      {
        class: `jp-Mesh-meshItem${selected ? ' jp-mod-selected' : ''}`,
        role: 'option',
        'aria-selected': selected ? 'true' : 'false',
        // one stop for Tab (the selected mesh, else the first); the arrow keys move
        // within the list, as in a listbox
        tabindex: selected || (!this._hasSelection() && mesh === this.model.meshes[0]) ? 0 : -1,
        'data-mesh-id': mesh.id,
        'data-key': mesh.id,
        'data-origin': mesh.origin,
        title: mesh.error ?? (mesh.address || 'starting…'),
        onclick: () => this.model.select(mesh.id),
        onkeydown: (e: KeyboardEvent) => {
          if (e.key === 'Enter' || e.key === ' ') {
            e.preventDefault(); // (Space would scroll the panel too)
            this.model.select(mesh.id);
            return;
          }
          const next = listboxMove(this.model.meshes.map(m => m.id), mesh.id, e.key);
          if (next !== null) {
            e.preventDefault(); // (the arrows would scroll the panel too)
            this.model.select(next);
            this.node.querySelector<HTMLElement>(`[data-mesh-id="${CSS.escape(next)}"]`)?.focus();
          }
        }
      },
      h(
        'div',
        { class: 'jp-Mesh-meshItemHead' },
        h('span', { class: `jp-Mesh-status jp-mod-${mesh.status}`, title: mesh.status }),
        h('span', { class: 'jp-Mesh-meshName' }, mesh.name),
        h('span', { class: `jp-Mesh-badge jp-mod-${mesh.origin}` }, originLabel(mesh))
      ),
      h(
        'div',
        { class: 'jp-Mesh-meshItemBody' },
        h('code', { class: 'jp-Mesh-address' }, mesh.address || 'starting…'),
        h('span', { class: 'jp-Mesh-counts' }, countsSummary(mesh.counts))
      ),
      kernelPaths.length && mesh.origin !== 'kernel'
        ? h('div', { class: 'jp-Mesh-kernels' }, `used by ${kernelPaths.join(', ')}`)
        : null
    );
  }
}
