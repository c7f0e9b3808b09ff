import { LabIcon } from '@jupyterlab/ui-components';

const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <circle cx="5" cy="5" r="2.6"/><circle cx="19" cy="5" r="2.6"/>
    <circle cx="5" cy="19" r="2.6"/><circle cx="19" cy="19" r="2.6"/>
    <circle cx="12" cy="12" r="3.1"/>
    <path d="M6.3 6.3l4 4 .9-.9-4-4zM17.7 6.3l-4 4 .9.9 4-4zM6.3 17.7l4-4 .9.9-4 4zM17.7 17.7l-4-4 .9-.9 4 4zM7.6 4.4h8.8v1.2H7.6zM7.6 18.4h8.8v1.2H7.6zM4.4 7.6h1.2v8.8H4.4zM18.4 7.6h1.2v8.8h-1.2z"/>
  </g>
</svg>`;

/** The Mesh sidebar's icon: five nodes, linked. */
export const meshIcon = new LabIcon({ name: 'jupyter-mesh:mesh', svgstr: svg });
