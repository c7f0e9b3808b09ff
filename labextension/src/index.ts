import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  InputDialog,
  Notification,
  showDialog
} from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStateDB } from '@jupyterlab/statedb';
import { ReadonlyPartialJSONObject } from '@lumino/coreutils';

import { CommandIDs } from './commands';
import { meshIcon } from './icon';
import {
  connectSnippet,
  ILocalOptions,
  isSafeLink,
  ISidebarState,
  kernelUsers,
  localOptionsFromSettings,
  restoreState
} from './model';
import { MeshesModel } from './meshes';
import { MeshSidebar } from './widgets/sidebar';

export { CommandIDs } from './commands';
export { requestAPI } from './request';

const PLUGIN_ID = 'jupyter-mesh:plugin';
const STATE_KEY = 'jupyter-mesh:sidebar';
const CATEGORY = 'Mesh';
const DEFAULT_INTERVAL = 2000;

/** The Mesh sidebar, its commands and its settings. */
const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    'A left-sidebar panel showing the heterogeneous Dask meshes of this server and its kernels.',
  autoStart: true,
  optional: [ILayoutRestorer, ISettingRegistry, IStateDB, ICommandPalette, INotebookTracker],
  activate: (
    app: JupyterFrontEnd,
    restorer: ILayoutRestorer | null,
    settingRegistry: ISettingRegistry | null,
    stateDB: IStateDB | null,
    palette: ICommandPalette | null,
    notebooks: INotebookTracker | null
  ) => {
    const { commands, shell } = app;
    const model = new MeshesModel();

    // Settings and saved state arrive later: activation must not wait on them.
    let settings: ISettingRegistry.ISettings | null = null;
    const interval = (): number => {
      const v = settings?.get('pollInterval').composite;
      return typeof v === 'number' && v >= 500 ? v : DEFAULT_INTERVAL;
    };
    const defaults = (): ILocalOptions =>
      localOptionsFromSettings(settings?.get('localMesh').composite);

    const state: ISidebarState = restoreState(undefined);
    let restored = false;
    const saveState = () => {
      if (stateDB && restored) {
        void stateDB.save(STATE_KEY, { ...state });
      }
    };
    model.selectionChanged.connect((_, id) => {
      state.selected = id;
      saveState();
    });

    const sidebar = new MeshSidebar({
      model,
      commands,
      interval: interval(),
      defaults: defaults(),
      connectAddress: state.connectAddress,
      onConnectAddress: address => {
        state.connectAddress = address;
        saveState();
      }
    });
    sidebar.title.icon = meshIcon;
    sidebar.title.caption = 'Mesh';

    if (settingRegistry) {
      const applySettings = () => {
        sidebar.setInterval(interval());
        sidebar.startForm.defaults = defaults();
      };
      settingRegistry
        .load(PLUGIN_ID)
        .then(loaded => {
          settings = loaded;
          settings.changed.connect(applySettings);
          applySettings();
        })
        .catch(error => console.warn('jupyter-mesh: could not load settings', error));
    }
    if (stateDB) {
      void app.restored
        .then(() => stateDB.fetch(STATE_KEY))
        .then(value => {
          const saved = restoreState(value);
          state.connectAddress = state.connectAddress || saved.connectAddress;
          sidebar.connectForm.address = state.connectAddress;
          if (saved.selected && !model.userSelected) {
            model.selected = saved.selected;
            state.selected = saved.selected;
            void sidebar.poll.refresh();
          }
        })
        .catch(reason => {
          // the sidebar works without its saved state; say why it was not restored
          console.warn('jupyter-mesh: could not restore the sidebar state', reason);
        })
        .then(() => {
          restored = true;
        });
    } else {
      restored = true;
    }

    const meshArg = (args: ReadonlyPartialJSONObject) =>
      (typeof args.id === 'string' && args.id) || model.selected;
    const summaryOf = (args: ReadonlyPartialJSONObject) =>
      model.meshes.find(m => m.id === meshArg(args)) ?? null;

    commands.addCommand(CommandIDs.open, {
      label: 'Show the Mesh Sidebar',
      icon: meshIcon,
      execute: () => shell.activateById(sidebar.id)
    });
    commands.addCommand(CommandIDs.refresh, {
      label: 'Refresh Meshes',
      execute: () => sidebar.poll.refresh()
    });
    commands.addCommand(CommandIDs.startLocal, {
      label: args => (args.cpu !== undefined ? 'Start Local Mesh' : 'Start Local Mesh (default options)'),
      caption: 'Start a Dask mesh on this server with the given (or default) options',
      isEnabled: () => !model.pending,
      execute: async args => {
        const options = { ...defaults(), ...(args as Partial<ILocalOptions>) };
        shell.activateById(sidebar.id);
        return model.start(options);
      }
    });
    commands.addCommand(CommandIDs.connect, {
      label: 'Connect to a Dask Scheduler…',
      isEnabled: () => !model.pending,
      execute: async args => {
        let address = typeof args.address === 'string' ? args.address : '';
        if (!address) {
          const result = await InputDialog.getText({
            title: 'Connect to a Dask scheduler',
            label: 'Scheduler address',
            placeholder: 'tcp://10.0.0.5:8786',
            text: state.connectAddress
          });
          if (!result.button.accept || !result.value) {
            return null;
          }
          address = result.value;
        }
        shell.activateById(sidebar.id);
        return model.connect(address);
      }
    });
    commands.addCommand(CommandIDs.scale, {
      label: 'Scale Mesh',
      isEnabled: args => !!summaryOf(args)?.can_scale && !model.pending,
      execute: args => {
        const id = meshArg(args);
        const counts = args.counts as Record<string, number> | undefined;
        if (!id || !counts) {
          return null;
        }
        return model.scale(id, counts);
      }
    });
    commands.addCommand(CommandIDs.stop, {
      label: args => (summaryOf(args)?.origin === 'connected' ? 'Disconnect from Mesh' : 'Stop Mesh'),
      isEnabled: args => !!summaryOf(args)?.can_stop && !model.pending,
      execute: async args => {
        const id = meshArg(args);
        if (!id) {
          return null;
        }
        const mesh = summaryOf(args);
        const users = mesh?.origin === 'sidebar' ? kernelUsers(mesh) : [];
        let body =
          `${users.join(', ')} ${users.length === 1 ? 'uses' : 'use'} ${mesh?.name ?? id}: ` +
          `stopping it ends the work of ${users.length === 1 ? 'its kernel' : 'their kernels'} there.`;
        if (!users.length) {
          // none known; the server checks again, and a kernel may have connected since
          const inUse = await model.stopUnlessUsed(id);
          if (inUse === null) {
            return null;
          }
          body = inUse.replace(/ \(the sidebar asks first[^)]*\)\.?$/, '');
        }
        // their kernels would lose it: ask first
        const answer = await showDialog({
          title: 'Stop this mesh?',
          body,
          buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Stop' })],
          defaultButton: 0 // Enter cancels: stopping takes a click on Stop
        });
        return answer.button.accept ? model.stop(id, true) : null;
      }
    });
    commands.addCommand(CommandIDs.openDashboard, {
      label: 'Open Mesh Dashboard',
      // (a mesh whose scheduler does not answer has no dashboard to show either)
      isEnabled: args =>
        summaryOf(args)?.status !== 'error' && isSafeLink(summaryOf(args)?.dashboard ?? ''),
      execute: args => {
        const url = summaryOf(args)?.dashboard;
        // only an http(s) address or a path of this server: never javascript: etc.
        if (url && isSafeLink(url)) {
          window.open(url, '_blank', 'noopener');
        }
      }
    });
    commands.addCommand(CommandIDs.insertSnippet, {
      label: 'Insert Mesh Connection Snippet',
      caption: 'Insert %load_ext jupyter_mesh / %mesh connect ADDRESS into the active notebook',
      // (a mesh still starting has no address to connect to yet; one that does not
      // answer has nothing to connect to)
      isEnabled: args =>
        !!summaryOf(args)?.address && !summaryOf(args)?.error && !!notebooks?.currentWidget,
      execute: async args => {
        const mesh = summaryOf(args);
        const panel = notebooks?.currentWidget;
        if (!mesh || !panel) {
          Notification.warning('Open a notebook first: the snippet goes into its active cell.');
          return;
        }
        const notebook = panel.content;
        const active = notebook.activeCell;
        if (!active || active.model.sharedModel.getSource().trim() !== '') {
          NotebookActions.insertBelow(notebook);
        }
        notebook.activeCell?.model.sharedModel.setSource(connectSnippet(mesh.address));
        shell.activateById(panel.id);
      }
    });

    if (palette) {
      for (const command of [
        CommandIDs.open,
        CommandIDs.refresh,
        CommandIDs.startLocal,
        CommandIDs.connect,
        CommandIDs.stop,
        CommandIDs.openDashboard,
        CommandIDs.insertSnippet
      ]) {
        palette.addItem({ command, category: CATEGORY });
      }
    }
    // keep the enabled state of the sidebar's buttons and palette items current
    model.changed.connect(() => commands.notifyCommandChanged());
    notebooks?.currentChanged.connect(() => commands.notifyCommandChanged(CommandIDs.insertSnippet));

    shell.add(sidebar, 'left', { rank: 250 });
    restorer?.add(sidebar, 'jupyter-mesh-sidebar');
  }
};

export default plugin;
