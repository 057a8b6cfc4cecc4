/**
 * kernelhib's JupyterLab and Notebook 7 extension: hibernate and wake kernels
 * from the notebook toolbar, the command palette, the Kernel menu and a sidebar
 * panel, with notifications; the state follows the server's event stream.
 */
import type {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, IToolbarWidgetRegistry } from '@jupyterlab/apputils';
import type { NotebookPanel } from '@jupyterlab/notebook';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { HibernationActions } from './actions';
import { addCommands } from './commands';
import { followNotebooks } from './notebooks';
import { notifyEvents } from './notifications';
import { HibernationPanel } from './panel';
import { addStatusItem } from './statusbar';
import { HibernationStore } from './store';
import { HibernationButton } from './toolbar';

/** The toolbar item's name in the settings' `jupyter.lab.toolbars`. */
const TOOLBAR_ITEM = 'kernelhib';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'kernelhib:plugin',
  description: 'Hibernate Jupyter kernels to disk and wake them intact.',
  autoStart: true,
  requires: [INotebookTracker, IToolbarWidgetRegistry],
  optional: [ICommandPalette, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    toolbarRegistry: IToolbarWidgetRegistry,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null
  ) => {
    const store = new HibernationStore(app.serviceManager);
    const actions = new HibernationActions(store);

    toolbarRegistry.addFactory<NotebookPanel>(
      'Notebook',
      TOOLBAR_ITEM,
      panel => new HibernationButton(panel, store, actions)
    );
    const panel = new HibernationPanel(store, actions);
    app.shell.add(panel, 'left', { rank: 900 });
    addCommands({
      commands: app.commands,
      tracker,
      store,
      actions,
      palette,
      showPanel: () => app.shell.activateById(panel.id)
    });
    if (statusBar) {
      addStatusItem(statusBar, tracker, store);
    }
    followNotebooks(tracker, store);
    notifyEvents(store);

    void store.refresh().catch(error => {
      console.warn(`kernelhib: could not list the kernels: ${error}`);
    });
  }
};

export default plugin;
