/**
 * The status bar item beside the kernel status: "Hibernated | 321.1 MiB freed"
 * while the current notebook's kernel is hibernated, hibernating or waking.
 * (JupyterLab's own kernel status only knows its fixed set of states.)
 */
import type { INotebookTracker } from '@jupyterlab/notebook';
import type { IStatusBar } from '@jupyterlab/statusbar';
import { Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';
import { hibernatedSummary, hibernationNotes, statusText } from './state';
import type { HibernationStore } from './store';

export function addStatusItem(
  statusBar: IStatusBar,
  tracker: INotebookTracker,
  store: HibernationStore
): void {
  const item = new Widget();
  item.addClass('jp-kernelhib-StatusItem');
  const activeStateChanged = new Signal<Widget, void>(item);
  const update = () => {
    const kernelId = tracker.currentWidget?.sessionContext.session?.kernel?.id;
    const view = kernelId ? store.view(kernelId) : undefined;
    const text = statusText(view);
    item.node.textContent = text;
    item.node.title =
      view?.state === 'hibernated'
        ? [
            `${hibernatedSummary(view)}.`,
            ...hibernationNotes(view),
            'Run a cell to wake it.'
          ].join('\n')
        : text;
    item.node.dataset.kernelhibState = view?.state ?? 'none';
    activeStateChanged.emit();
  };
  store.changed.connect(update);
  tracker.currentChanged.connect(update);
  statusBar.registerStatusItem('kernelhib:status', {
    item,
    align: 'left',
    rank: 2,
    isActive: () => item.node.textContent !== '',
    activeStateChanged
  });
  update();
}
