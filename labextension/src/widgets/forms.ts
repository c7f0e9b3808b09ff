import { CommandRegistry } from '@lumino/commands';
import { Widget } from '@lumino/widgets';

import { CommandIDs } from '../commands';
import {
  ILocalOptions,
  normalizeAddress,
  parseLocalOptions,
  START_LABELS,
  withLabels
} from '../model';
import { MeshesModel } from '../meshes';
import { h, replaceChildren } from './dom';

export namespace StartLocalWidget {
  export interface IOptions {
    model: MeshesModel;
    commands: CommandRegistry;
    /** the options the form starts with (from the settings) */
    defaults: ILocalOptions;
  }
}

/** A form that starts a local mesh with the options the user picks. */
export class StartLocalWidget extends Widget {
  constructor(options: StartLocalWidget.IOptions) {
    super({ node: document.createElement('details') });
    this.addClass('jp-Mesh-start');
    this.model = options.model;
    this.commands = options.commands;
    this._build(options.defaults);
    this.model.changed.connect(this._update, this);
  }

  readonly model: MeshesModel;
  readonly commands: CommandRegistry;

  /** New defaults from the settings; fields the user has not touched follow them. */
  set defaults(value: ILocalOptions) {
    for (const [key, input] of Object.entries(this._inputs)) {
      if (!input.dataset.touched) {
        input.value = String(value[key as keyof ILocalOptions]);
      }
    }
  }

  /** Open the form (e.g. from the empty state). */
  open(): void {
    (this.node as HTMLDetailsElement).open = true;
  }

  private _build(defaults: ILocalOptions): void {
    const field = (key: keyof ILocalOptions, label: string, hint: string) => {
      const input = h('input', {
        class: 'jp-mod-styled',
        name: key,
        value: defaults[key],
        title: hint,
        'aria-label': label,
        oninput: () => {
          input.dataset.touched = 'true';
          this._error.hidden = true; // what it said was about the text before
        }
      });
      this._inputs[key] = input;
      return h('label', { class: 'jp-Mesh-field' }, h('span', {}, label), input);
    };
    this._error = h('div', { class: 'jp-Mesh-error', role: 'alert', hidden: true });
    this._button = h(
      'button',
      { class: 'jp-Button jp-mod-styled jp-mod-accept jp-Mesh-button jp-Mesh-startButton', type: 'submit' },
      'Start'
    );
    replaceChildren(
      this.node,
      h('summary', { class: 'jp-Mesh-sectionTitle' }, 'Start a local mesh'),
      h(
        'form',
        { class: 'jp-Mesh-form', onsubmit: (e: Event) => this._submit(e) },
        h(
          'div',
          { class: 'jp-Mesh-fields' },
          field('cpu', 'CPU workers', 'CPU worker processes (NumPy)'),
          field('jax_cpu', 'JAX CPU workers', 'CPU workers driven by JAX'),
          field('gpu', 'GPUs', "a number, or 'auto': one worker per CUDA GPU found"),
          field('tpu', 'TPUs', "a number, or 'auto': one worker per TPU found"),
          field('site', 'Site', 'site label of the workers')
        ),
        this._error,
        this._button
      )
    );
  }

  private _submit(event: Event): void {
    event.preventDefault();
    const fields: Record<string, string> = {};
    for (const [key, input] of Object.entries(this._inputs)) {
      fields[key] = input.value;
    }
    const parsed = parseLocalOptions(fields);
    if ('error' in parsed) {
      this._error.textContent = parsed.error;
      this._error.hidden = false;
      return;
    }
    this._error.hidden = true;
    void this.commands.execute(CommandIDs.startLocal, { ...parsed.options }).then(() =>
      showRefusal(this.model, this.node as HTMLDetailsElement, this._error, START_LABELS)
    );
  }

  private _update(): void {
    this._button.disabled = !!this.model.pending;
    this._button.textContent =
      this.model.pending === 'Starting a local mesh…' ? 'Starting…' : 'Start';
  }

  private _inputs: Record<string, HTMLInputElement> = {};
  private _error!: HTMLElement;
  private _button!: HTMLButtonElement;
}

/**
 * The server refused a form's request: say why next to the form, where the user looks
 * (the panel's banner may be scrolled out of view), instead of in the banner; a form
 * closed meanwhile leaves it in the banner.
 */
function showRefusal(
  model: MeshesModel,
  form: HTMLDetailsElement,
  error: HTMLElement,
  labels: Record<string, string> = {}
): void {
  const why = model.actionError;
  if (why && form.open) {
    error.textContent = withLabels(why, labels); // its fields as the form names them
    error.hidden = false;
    model.dismissError();
  }
}

export namespace ConnectWidget {
  export interface IOptions {
    model: MeshesModel;
    commands: CommandRegistry;
    /** the address the field starts with (restored state) */
    address: string;
    /** called as the address changes, to remember it */
    onAddress: (address: string) => void;
  }
}

/** A form that connects the server to a running Dask scheduler. */
export class ConnectWidget extends Widget {
  constructor(options: ConnectWidget.IOptions) {
    super({ node: document.createElement('details') });
    this.addClass('jp-Mesh-connect');
    this.model = options.model;
    this.commands = options.commands;
    const input = (this._input = h('input', {
      class: 'jp-mod-styled',
      name: 'address',
      placeholder: 'tcp://10.0.0.5:8786',
      'aria-label': 'Scheduler address',
      value: options.address,
      oninput: () => {
        error.hidden = true; // what it said was about the text before
        options.onAddress(input.value);
      }
    }));
    const error = h('div', { class: 'jp-Mesh-error', role: 'alert', hidden: true });
    this._button = h(
      'button',
      { class: 'jp-Button jp-mod-styled jp-mod-accept jp-Mesh-button', type: 'submit' },
      'Connect'
    );
    const submit = (e: Event) => {
      e.preventDefault();
      try {
        const address = normalizeAddress(input.value);
        error.hidden = true;
        void this.commands.execute(CommandIDs.connect, { address }).then(() =>
          showRefusal(this.model, this.node as HTMLDetailsElement, error)
        );
      } catch (err) {
        error.textContent = (err as Error).message;
        error.hidden = false;
      }
    };
    replaceChildren(
      this.node,
      h('summary', { class: 'jp-Mesh-sectionTitle' }, 'Connect to a scheduler'),
      h('form', { class: 'jp-Mesh-form', onsubmit: submit },
        h('div', { class: 'jp-Mesh-connectRow' }, input, this._button),
        error,
        h('div', { class: 'jp-Mesh-hint' },
          'TLS schedulers: connect from a notebook with %mesh connect … --tls-ca-file …; ' +
          'the mesh then shows up here.'))
    );
    if (options.address) {
      (this.node as HTMLDetailsElement).open = true;
    }
    this.model.changed.connect(() => {
      this._button.disabled = !!this.model.pending;
    }, this);
  }

  readonly model: MeshesModel;
  readonly commands: CommandRegistry;

  /** Set the address field unless the user is typing in it. */
  set address(value: string) {
    if (document.activeElement !== this._input && value && !this._input.value) {
      this._input.value = value;
      (this.node as HTMLDetailsElement).open = true;
    }
  }

  private _button: HTMLButtonElement;
  private _input: HTMLInputElement;
}
