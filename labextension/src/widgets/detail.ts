import { CommandRegistry } from '@lumino/commands';
import { Panel, Widget } from '@lumino/widgets';

import { CommandIDs } from '../commands';
import {
  FAMILIES,
  formatBytes,
  formatSeconds,
  fraction,
  IDevice,
  IMeshDetail,
  IPlanRecord,
  kernelHint,
  noDevicesHint,
  planCell,
  planColumns,
  planHeader,
  parseScale,
  planRowTitle,
  sortGroups,
  sparklinePoints,
  SCALE_LABELS,
  UNREACHABLE,
  withLabels
} from '../model';
import { MeshesModel } from '../meshes';
import { h, meter, refocusIfLost, replaceChildren, rerender, sparkline } from './dom';

export namespace MeshDetailWidget {
  export interface IOptions {
    model: MeshesModel;
    commands: CommandRegistry;
  }
}

/** Base of the parts of the selected mesh's view: re-render on every model change. */
abstract class DetailPart extends Widget {
  constructor(options: MeshDetailWidget.IOptions) {
    super();
    this.model = options.model;
    this.commands = options.commands;
    // only the selected mesh's details: a reply for another one is never shown (its
    // buttons would act on a mesh the user did not pick)
    this.model.changed.connect(() => {
      const detail = this.model.detail;
      this.render(detail && detail.id === this.model.selected ? detail : null);
    }, this);
  }

  readonly model: MeshesModel;
  readonly commands: CommandRegistry;

  abstract render(detail: IMeshDetail | null): void;
}

/** Actions on the selected mesh: dashboard, snippet, stop. */
export class MeshActionsWidget extends DetailPart {
  constructor(options: MeshDetailWidget.IOptions) {
    super(options);
    this.addClass('jp-Mesh-actions');
  }

  render(detail: IMeshDetail | null): void {
    if (!detail) {
      replaceChildren(this.node);
      return;
    }
    const button = (label: string, id: string, cls: string, title: string) =>
      h(
        'button',
        {
          // Stop stands out: it ends a mesh
          class: `jp-Button jp-mod-styled ${id === CommandIDs.stop ? 'jp-mod-warn' : 'jp-mod-reject'} jp-Mesh-button ${cls}`,
          'data-key': id,
          title,
          disabled: !this.commands.isEnabled(id, { id: detail.id }) || !!this.model.pending,
          onclick: () => {
            const sidebar = this.node.closest('.jp-MeshSidebar');
            void this.commands.execute(id, { id: detail.id }).finally(() => {
              // Stop takes its button away: keyboard focus goes on in the sidebar,
              // not back to the top of the page
              if (sidebar) {
                refocusIfLost(sidebar);
              }
            });
          }
        },
        label
      );
    rerender(
      this.node,
      h(
        'div',
        { class: 'jp-Mesh-detailHead' },
        h('span', { class: 'jp-Mesh-detailName' }, detail.name),
        h('code', { class: 'jp-Mesh-address' }, detail.address || 'starting…')
      ),
      detail.error ? h('div', { class: 'jp-Mesh-error' }, detail.error) : null,
      h(
        'div',
        { class: 'jp-Mesh-buttons' },
        button('Dashboard', CommandIDs.openDashboard, 'jp-Mesh-dashboardButton',
          detail.dashboard ?? 'this mesh has no dashboard'),
        button('Insert snippet', CommandIDs.insertSnippet, 'jp-Mesh-snippetButton',
          'Insert %load_ext jupyter_mesh / %mesh connect into the active notebook'),
        detail.can_stop
          ? button(
              detail.origin === 'sidebar' ? 'Stop' : 'Disconnect',
              CommandIDs.stop,
              'jp-Mesh-stopButton',
              detail.origin === 'sidebar'
                ? 'Stop this mesh: its scheduler and workers'
                : 'Forget this mesh (the scheduler keeps running)'
            )
          : null
      ),
      kernelHint(detail) ? h('div', { class: 'jp-Mesh-hint' }, kernelHint(detail)) : null
    );
  }
}

/** Worker counts per family for a mesh this server started. */
export class ScaleWidget extends DetailPart {
  constructor(options: MeshDetailWidget.IOptions) {
    super(options);
    this.addClass('jp-Mesh-scale');
  }

  render(detail: IMeshDetail | null): void {
    if (!detail || !detail.can_scale) {
      this._key = '';
      replaceChildren(this.node);
      return;
    }
    const scale = JSON.stringify(detail.scale);
    if (detail.id !== this._refusedFor ||
        (this._refusal?.startsWith(UNREACHABLE) && !this.model.loadError) ||
        (this._refusal !== null && scale !== this._refusedAt)) {
      // (said of another mesh, of a server that is back, or of counts that changed
      // since: "busy with another change" once that change is done)
      this._refusal = null;
    }
    const key = `${detail.id}:${JSON.stringify(detail.scale)}:${!!this.model.pending}:` +
      `${this._refusal}`;
    if (key === this._key || this.node.contains(document.activeElement)) {
      return; // keep what the user is typing
    }
    this._key = key;
    // what was wrong with the last request, next to the form where the user looks
    // (the panel's banner may be scrolled out of view)
    const error = h('div', { class: 'jp-Mesh-error', role: 'alert', hidden: !this._refusal },
      this._refusal ?? '');
    const say = (why: string | null) => {
      this._refusal = why;
      this._refusedFor = detail.id;
      this._refusedAt = JSON.stringify(this.model.detail?.scale ?? detail.scale);
      error.textContent = why ?? '';
      error.hidden = !why;
    };
    const inputs: Record<string, HTMLInputElement> = {};
    const fields = FAMILIES.map(f => {
      inputs[f.key] = h('input', {
        class: 'jp-mod-styled jp-Mesh-count',
        type: 'number',
        min: 0,
        step: 1,
        name: `scale-${f.key}`,
        'aria-label': `${f.label} workers`,
        value: detail.scale[f.key] ?? 0,
        oninput: () => say(null) // (it was about the numbers before)
      });
      return h('label', { class: 'jp-Mesh-field' }, h('span', {}, f.label), inputs[f.key]);
    });
    const submit = (e: Event) => {
      e.preventDefault();
      const fields: Record<string, string> = {};
      for (const [family, input] of Object.entries(inputs)) {
        fields[family] = input.value;
      }
      const parsed = parseScale(fields, detail.scale);
      if ('error' in parsed) {
        say(parsed.error);
        return;
      }
      say(null);
      if (Object.keys(parsed.counts).length) {
        void this.commands
          .execute(CommandIDs.scale, { id: detail.id, counts: parsed.counts })
          .finally(() => {
            // the server's refusal, next to the form too
            const why = this.model.actionError;
            if (why) {
              say(withLabels(why, SCALE_LABELS)); // its fields as the form names them
              this.model.dismissError();
            }
            // show the mesh's counts again (not the numbers typed, if refused)
            const focused = document.activeElement;
            let name: string | null = null;
            if (focused instanceof HTMLElement && this.node.contains(focused)) {
              name = focused.getAttribute('name');
              focused.blur();
            }
            this._key = '';
            const now = this.model.detail;
            this.render(now && now.id === this.model.selected ? now : null);
            // ...and the keyboard stays where it was (it fell to the top of the page)
            if (name) {
              this.node.querySelector<HTMLElement>(`[name="${CSS.escape(name)}"]`)
                ?.focus({ preventScroll: true });
            }
          });
      }
    };
    replaceChildren(
      this.node,
      h(
        'form',
        { class: 'jp-Mesh-form jp-Mesh-scaleForm', onsubmit: submit },
        h('div', { class: 'jp-Mesh-sectionTitle' }, 'Scale'),
        h('div', { class: 'jp-Mesh-fields' }, ...fields),
        error,
        h(
          'button',
          {
            class: 'jp-Button jp-mod-styled jp-mod-accept jp-Mesh-button',
            type: 'submit',
            name: 'scale-submit',
            disabled: !!this.model.pending
          },
          'Scale'
        )
      )
    );
  }

  private _key = '';
  /** what was wrong with the last scale request, and of which mesh */
  private _refusal: string | null = null;
  private _refusedFor = '';
  /** the mesh's counts when the refusal was said */
  private _refusedAt = '';
}

const SPARK_W = 120;
const SPARK_H = 22;

/** The mesh's load over the last minute: tasks, memory, CPU. */
export class UtilizationWidget extends DetailPart {
  constructor(options: MeshDetailWidget.IOptions) {
    super(options);
    this.addClass('jp-Mesh-utilization');
  }

  render(detail: IMeshDetail | null): void {
    if (!detail || detail.history.length === 0) {
      replaceChildren(this.node);
      return;
    }
    const hist = detail.history;
    const last = hist[hist.length - 1];
    const memMax = Math.max(...hist.map(s => s.memory), 1);
    const row = (label: string, values: number[], now: string, cls: string, max?: number) =>
      h(
        'div',
        { class: 'jp-Mesh-utilRow' },
        h('span', { class: 'jp-Mesh-utilLabel' }, label),
        sparkline(sparklinePoints(values, SPARK_W, SPARK_H, max), SPARK_W, SPARK_H, cls,
          `${label} over the last ${hist.length} samples`),
        h('span', { class: 'jp-Mesh-utilNow' }, now)
      );
    replaceChildren(
      this.node,
      h('div', { class: 'jp-Mesh-sectionTitle' }, 'Load'),
      row('Tasks', hist.map(s => s.tasks), String(last.tasks), 'jp-mod-tasks'),
      row('Memory', hist.map(s => s.memory_used), 
        `${formatBytes(last.memory_used)} / ${formatBytes(last.memory)}`, 'jp-mod-memory',
        memMax),
      row('CPU', hist.map(s => s.cpu ?? 0),
        last.cpu === null ? '-' : `${Math.round(last.cpu)} %`, 'jp-mod-cpu', 100)
    );
  }
}

/** The devices, grouped by kind and site. */
export class DeviceGroupsWidget extends DetailPart {
  constructor(options: MeshDetailWidget.IOptions) {
    super(options);
    this.addClass('jp-Mesh-devices');
  }

  render(detail: IMeshDetail | null): void {
    if (!detail) {
      replaceChildren(this.node);
      return;
    }
    if (detail.groups.length === 0) {
      replaceChildren(
        this.node,
        h('div', { class: 'jp-Mesh-sectionTitle' }, 'Devices'),
        h('div', { class: 'jp-Mesh-hint' }, noDevicesHint(detail))
      );
      return;
    }
    replaceChildren(
      this.node,
      h('div', { class: 'jp-Mesh-sectionTitle' }, 'Devices'),
      ...sortGroups(detail.groups).map(g =>
        h(
          'section',
          { class: 'jp-Mesh-group', 'data-kind': g.kind, 'data-site': g.site },
          h(
            'div',
            { class: 'jp-Mesh-groupHead' },
            h('span', { class: `jp-Mesh-kind jp-mod-${g.kind}` }, g.kind.toUpperCase()),
            h('span', {}, ` @ ${g.site} · ${g.devices.length} device${g.devices.length > 1 ? 's' : ''}`),
            h('span', { class: 'jp-Mesh-groupMem' },
              `${formatBytes(g.memory_used)} / ${formatBytes(g.memory)} · ${g.tasks} tasks`)
          ),
          h('table', { class: 'jp-Mesh-deviceTable' },
            h('tbody', {}, ...g.devices.map(d => this._device(d, detail))))
        )
      )
    );
  }

  private _device(d: IDevice, detail: IMeshDetail): HTMLElement {
    const hist = detail.device_history[d.worker] ?? [];
    const cpu = hist.map(s => s[1]);
    return h(
      'tr',
      { class: 'jp-Mesh-device', 'data-kind': d.kind, 'data-worker': d.worker, title: d.worker },
      h('td', { class: 'jp-Mesh-deviceName' }, d.name || d.worker,
        h('div', { class: 'jp-Mesh-deviceModel' }, `${d.backend} · ${d.model || 'unknown model'}`)),
      h('td', { class: 'jp-Mesh-deviceMem' },
        meter(fraction(d.memory_used, d.memory), 'memory in use'),
        h('div', { class: 'jp-Mesh-small' },
          `${formatBytes(d.memory_used)} / ${formatBytes(d.memory)}`)),
      h('td', { class: 'jp-Mesh-deviceTasks', title: 'tasks running' }, `${d.tasks} tasks`),
      h('td', { class: 'jp-Mesh-deviceSpark' },
        sparkline(sparklinePoints(cpu, 48, 14, 100), 48, 14, 'jp-mod-cpu', 'CPU % history'))
    );
  }
}

/** The router's recent plans and reports, newest first. */
export class PlansWidget extends DetailPart {
  constructor(options: MeshDetailWidget.IOptions) {
    super(options);
    this.addClass('jp-Mesh-plans');
  }

  render(detail: IMeshDetail | null): void {
    if (!detail || detail.plans.length === 0) {
      // nothing to show until the router has planned something on this mesh
      this.node.dataset.empty = 'true';
      replaceChildren(this.node);
      return;
    }
    delete this.node.dataset.empty;
    rerender(
      this.node,
      h('div', { class: 'jp-Mesh-sectionTitle' }, 'Router plans'),
      ...detail.plans.map(p => this._plan(p))
    );
  }

  private _plan(plan: IPlanRecord): HTMLElement {
    const cols = planColumns(plan.rows);
    const when = new Date(plan.at * 1000).toLocaleTimeString();
    const headline =
      plan.kind === 'report'
        ? `Report · ${when}${plan.wall_seconds !== undefined ? ` · ${formatSeconds(plan.wall_seconds)} wall` : ''}`
        : `Plan · ${when}${plan.makespan !== undefined ? ` · est. ${formatSeconds(plan.makespan)}` : ''}`;
    return h(
      'details',
      // (an open one stays open as the sidebar refreshes)
      { class: `jp-Mesh-plan jp-mod-${plan.kind}`, 'data-key': `${plan.kind}-${plan.at}` },
      h('summary', { title: plan.title ?? '', 'data-key': `${plan.kind}-${plan.at}-summary` },
        headline,
        plan.route ? h('span', { class: 'jp-Mesh-badge' }, `route=${plan.route}`) : null),
      h('div', { class: 'jp-Mesh-planScroll' }, h(
        'table',
        { class: 'jp-Mesh-planTable' },
        h('thead', {}, h('tr', {}, ...cols.map(c => h('th', { 'data-col': c }, planHeader(c))))),
        h('tbody', {}, ...plan.rows.map(r =>
          h('tr', { title: planRowTitle(r, cols) },
            ...cols.map(c => h('td', { 'data-col': c },
              ...breakable(c, planCell(c, r[c]))))))))
      ),
      plan.truncated ? h('div', { class: 'jp-Mesh-hint' }, 'Only the first rows are shown.') : null,
      plan.notes?.length
        ? h('ul', { class: 'jp-Mesh-planNotes' }, ...plan.notes.map(n => h('li', {}, n)))
        : null
    );
  }
}

/**
 * A cell's text with a line-break opportunity after each `_`, `-`, `.` and `:` of an
 * op's name or a target (`random_sample`, `cpu:jax×12 + cpu:numpy×4`), so that a
 * narrow sidebar breaks it there, not in the middle of a word.
 */
function breakable(col: string, text: string): (string | HTMLElement)[] {
  if (col !== 'op' && col !== 'target' && col !== 'backends' && col !== 'workers') {
    return [text];
  }
  // (no lookbehind in the pattern: Safari before 16.4 rejects the whole script)
  const out: (string | HTMLElement)[] = [];
  let piece = '';
  for (const c of text) {
    piece += c;
    if ('_-.:'.includes(c)) {
      out.push(piece, h('wbr'));
      piece = '';
    }
  }
  if (piece) {
    out.push(piece);
  }
  return out;
}

/** The selected mesh: actions, scaling, load, devices and plans. */
export class MeshDetailWidget extends Panel {
  constructor(options: MeshDetailWidget.IOptions) {
    super();
    this.addClass('jp-Mesh-detail');
    for (const Part of [MeshActionsWidget, ScaleWidget, UtilizationWidget,
      DeviceGroupsWidget, PlansWidget]) {
      const part = new Part(options);
      part.render(options.model.detail);
      this.addWidget(part);
    }
  }
}
