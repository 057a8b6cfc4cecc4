/**
 * What each notebook's kernel needs: the `kernelhib` comm target (the
 * `%hibernate` magic opens it; its messages need no answer), and a "waking"
 * state as soon as a cell is sent to a hibernated kernel, which the server
 * then wakes.
 */
import type { INotebookTracker } from '@jupyterlab/notebook';
import { NotebookActions } from '@jupyterlab/notebook';
import type { Kernel } from '@jupyterlab/services';
import type { HibernationStore } from './store';

export const COMM_TARGET = 'kernelhib';

function acceptComms(kernel: Kernel.IKernelConnection | null): void {
  // Opened comms are kept and their messages ignored.
  kernel?.registerCommTarget(COMM_TARGET, () => undefined);
}

export function followNotebooks(
  tracker: INotebookTracker,
  store: HibernationStore
): void {
  tracker.widgetAdded.connect((_, panel) => {
    const { sessionContext } = panel;
    acceptComms(sessionContext.session?.kernel ?? null);
    sessionContext.kernelChanged.connect((_, change) =>
      acceptComms(change.newValue)
    );
  });
  NotebookActions.executionScheduled.connect((_, { notebook }) => {
    const panel = tracker.find(candidate => candidate.content === notebook);
    const kernelId = panel?.sessionContext.session?.kernel?.id;
    if (kernelId) {
      store.expectWake(kernelId);
    }
  });
}
