import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Widget } from '@lumino/widgets';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-mesh:plugin',
  description: 'The Mesh sidebar',
  autoStart: true,
  optional: [ILayoutRestorer],
  activate: (app: JupyterFrontEnd, restorer: ILayoutRestorer | null) => {
    const panel = new Widget();
    panel.id = 'jupyter-mesh-sidebar';
    panel.title.caption = 'Mesh';
    panel.title.label = 'Mesh';
    panel.node.textContent = 'Mesh';
    app.shell.add(panel, 'left', { rank: 200 });
    restorer?.add(panel, panel.id);
  }
};

export default plugin;
