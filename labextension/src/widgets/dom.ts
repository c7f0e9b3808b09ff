type Child = Node | string | number | null | undefined | false;

/**
 * Create an element: `h('div', {class: 'x', onclick: fn}, child, ...)`.
 * Attributes starting with `on` are event listeners; `false`/`null` ones are skipped.
 */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, unknown> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) {
      continue;
    }
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value as EventListener);
    } else if (key === 'value' && 'value' in el) {
      (el as unknown as HTMLInputElement).value = String(value);
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

/** Append children, skipping empty ones. */
export function append(el: Element, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    el.appendChild(
      typeof child === 'object' ? child : document.createTextNode(String(child))
    );
  }
}

/** Replace all children of `el`. */
export function replaceChildren(el: Element, ...children: Child[]): void {
  while (el.firstChild) {
    el.removeChild(el.firstChild);
  }
  append(el, children);
}

/**
 * Replace all children of `el`, keeping what the user was doing in it: the element
 * with keyboard focus and the open `<details>` come back focused and open where the
 * new children have one with the same `data-key` (a poll re-renders every second or
 * two: without this, focus fell to the page and an open plan closed).
 */
export function rerender(el: Element, ...children: Child[]): void {
  const keyOf = (e: Element | null): string | undefined =>
    e instanceof HTMLElement ? e.dataset.key : undefined;
  const active = document.activeElement;
  const focused = active && el.contains(active) ? keyOf(active) : undefined;
  const open = new Set(
    Array.from(el.querySelectorAll('details[open]'))
      .map(keyOf)
      .filter((k): k is string => !!k)
  );
  replaceChildren(el, ...children);
  for (const d of Array.from(el.querySelectorAll('details'))) {
    const key = keyOf(d);
    if (key && open.has(key)) {
      (d as HTMLDetailsElement).open = true;
    }
  }
  if (focused) {
    const again = Array.from(el.querySelectorAll('[data-key]')).find(
      e => keyOf(e) === focused
    );
    if (again instanceof HTMLElement) {
      again.focus({ preventScroll: true }); // (the user may have scrolled away from it)
    }
  }
}

/**
 * Where the element with keyboard focus went away (a button the action removed), focus
 * the next sensible place in `root`: the selected mesh in the list, else the first
 * one, else the first form's summary; nothing is done where focus is still somewhere.
 */
export function refocusIfLost(root: Element): void {
  const active = document.activeElement;
  if (active && active !== document.body && active.isConnected) {
    return;
  }
  // (one after another: a list of selectors finds the first match in the page's
  // order, the list before its items, and the list itself takes no focus)
  for (const selector of ['.jp-Mesh-meshItem[tabindex="0"]', '.jp-Mesh-meshItem',
    'details > summary']) {
    const next = root.querySelector<HTMLElement>(selector);
    if (next) {
      next.focus({ preventScroll: true });
      return;
    }
  }
}

const SVG_NS = 'http://www.w3.org/2000/svg';

/** A small SVG line chart of `points` (see `sparklinePoints`). */
export function sparkline(
  points: string,
  width: number,
  height: number,
  className: string,
  title: string
): SVGSVGElement {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('width', String(width));
  svg.setAttribute('height', String(height + 2));
  svg.setAttribute('viewBox', `0 -1 ${width} ${height + 2}`);
  svg.setAttribute('class', `jp-Mesh-sparkline ${className}`);
  const t = document.createElementNS(SVG_NS, 'title');
  t.textContent = title;
  svg.appendChild(t);
  const base = document.createElementNS(SVG_NS, 'line');
  base.setAttribute('x1', '0');
  base.setAttribute('x2', String(width));
  base.setAttribute('y1', String(height));
  base.setAttribute('y2', String(height));
  base.setAttribute('class', 'jp-Mesh-sparklineBase');
  svg.appendChild(base);
  if (points) {
    const line = document.createElementNS(SVG_NS, 'polyline');
    line.setAttribute('points', points);
    line.setAttribute('class', 'jp-Mesh-sparklineLine');
    svg.appendChild(line);
  }
  return svg;
}

/** A horizontal bar showing a fraction in [0, 1]. */
export function meter(value: number, title: string): HTMLElement {
  const pct = Math.round(value * 100);
  return h(
    'div',
    { class: 'jp-Mesh-meter', title, role: 'meter', 'aria-valuenow': pct },
    h('div', {
      class: `jp-Mesh-meterFill${value > 0.85 ? ' jp-mod-high' : ''}`,
      style: `width: ${pct}%`
    })
  );
}
