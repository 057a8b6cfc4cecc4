/**
 * JupyterLab notifications for kernelhib's events: hibernated, woken (with the
 * variables a snapshot engine could not bring back), and failures.
 */
import { Notification } from '@jupyterlab/apputils';
import { eventNotice } from './state';
import type { HibernationStore } from './store';

export function notifyEvents(store: HibernationStore): void {
  store.events.connect((_, event) => {
    const notice = eventNotice(event, store.label(event.kernel_id));
    if (notice === null) {
      return;
    }
    Notification.emit(notice.message, notice.type, {
      autoClose: notice.type === 'success' ? 5000 : false
    });
  });
}
