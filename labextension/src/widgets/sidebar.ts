import { CommandRegistry } from '@lumino/commands';
import { Poll } from '@lumino/polling';
import { Panel, Widget } from '@lumino/widgets';

import { CommandIDs } from '../commands';
import { ILocalOptions, loadErrorHint, UNREACHABLE } from '../model';
import { MeshesModel } from '../meshes';
import { MeshDetailWidget } from './detail';
import { h, replaceChildren } from './dom';
import { ConnectWidget, StartLocalWidget } from './forms';
import { MeshListWidget } from './list';

export namespace MeshSidebar {
  export interface IOptions {
    model: MeshesModel;
    commands: CommandRegistry;
    /** milliseconds between refreshes while the sidebar is visible */
    interval: number;
    /** local-mesh options the start form shows first */
    defaults: ILocalOptions;
    /** the connect field's first value (restored state) */
    connectAddress: string;
    /** remembers the connect field's value */
    onConnectAddress: (address: string) => void;
  }
}

/** Header: title, what is under way, refresh. */
class HeaderWidget extends Widget {
  constructor(model: MeshesModel, commands: CommandRegistry) {
    super();
    this.addClass('jp-Mesh-header');
    const status = h('span', { class: 'jp-Mesh-pending', 'aria-live': 'polite' });
    replaceChildren(
      this.node,
      h('h2', { class: 'jp-Mesh-title' }, 'Mesh'),
      status,
      h('button', {
        class: 'jp-Button jp-mod-minimal jp-Mesh-refresh',
        title: 'Refresh',
        'aria-label': 'Refresh',
        onclick: () => void commands.execute(CommandIDs.refresh)
      }, '⟳')
    );
    model.changed.connect(() => {
      status.textContent = model.pending ?? '';
    });
  }
}

/** The errors of the last refresh and the last action, with what to do next. */
class ErrorsWidget extends Widget {
  constructor(model: MeshesModel) {
    super();
    this.addClass('jp-Mesh-errors');
    model.changed.connect(() => {
      replaceChildren(
        this.node,
        model.loadError
          ? h('div', { class: 'jp-Mesh-error', role: 'alert' },
              h('b', {}, loadErrorHint(model.loadStatus).title),
              // (no answer at all: the heading and the hint say it all)
              model.loadError.startsWith(UNREACHABLE) ? null : model.loadError,
              h('div', { class: 'jp-Mesh-hint' }, loadErrorHint(model.loadStatus).hint))
          : null,
        model.actionError
          ? h('div', { class: 'jp-Mesh-error jp-Mesh-actionError jp-mod-dismissable', role: 'alert' },
              model.actionError,
              h('button', {
                class: 'jp-Button jp-mod-minimal jp-Mesh-dismiss',
                title: 'Dismiss',
                'aria-label': 'Dismiss',
                onclick: () => model.dismissError()
              }, '×'))
          : null
      );
    });
  }
}

/**
 * The Mesh sidebar: the meshes, the selected one's devices and plans, and forms to
 * start or connect. It refreshes with a `Poll` while visible, and backs off on errors.
 */
export class MeshSidebar extends Panel {
  constructor(options: MeshSidebar.IOptions) {
    super();
    this.id = 'jupyter-mesh-sidebar';
    this.addClass('jp-MeshSidebar');
    this.model = options.model;
    this.startForm = new StartLocalWidget({
      model: options.model, commands: options.commands, defaults: options.defaults
    });
    this.connectForm = new ConnectWidget({
      model: options.model,
      commands: options.commands,
      address: options.connectAddress,
      onAddress: options.onConnectAddress
    });
    const list = new MeshListWidget({ model: options.model });
    const detail = new MeshDetailWidget({ model: options.model, commands: options.commands });
    for (const w of [
      new HeaderWidget(options.model, options.commands),
      new ErrorsWidget(options.model),
      list,
      detail,
      this.startForm,
      this.connectForm
    ]) {
      this.addWidget(w);
    }
    // while the server does not answer, what is shown is what it said last: dimmed,
    // and said so to screen readers, not shown as live
    options.model.changed.connect(() => {
      const stale = !!options.model.loadError?.startsWith(UNREACHABLE);
      for (const w of [list, detail]) {
        w.toggleClass('jp-mod-stale', stale);
        if (stale) {
          w.node.setAttribute('aria-description', 'as last seen: the server does not answer');
        } else {
          w.node.removeAttribute('aria-description');
        }
      }
    });
    this.poll = new Poll({
      name: 'jupyter-mesh:meshes',
      factory: () => this.model.refresh(),
      frequency: { interval: options.interval, backoff: true, max: 60 * 1000 },
      // paused while the panel or the browser tab is hidden
      standby: () => !this.isVisible || 'when-hidden'
    });
  }

  readonly model: MeshesModel;
  readonly poll: Poll;
  readonly startForm: StartLocalWidget;
  readonly connectForm: ConnectWidget;

  /** Change how often the sidebar refreshes. */
  setInterval(interval: number): void {
    this.poll.frequency = { ...this.poll.frequency, interval };
  }

  protected onAfterShow(): void {
    void this.poll.refresh();
  }

  dispose(): void {
    if (!this.isDisposed) {
      this.poll.dispose();
    }
    super.dispose();
  }
}
