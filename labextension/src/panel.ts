/**
 * The sidebar panel: every kernel of the server with its notebooks, state,
 * memory, image size, engine and last activity; hibernate, wake and discard
 * actions; the variables a dill wake lost, with the cells that re-create them
 * and a Recompute action; and the memory freed by all hibernated kernels.
 */
import { refreshIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';
import type { Message } from '@lumino/messaging';
import type { HibernationActions } from './actions';
import { hibernatedIcon } from './icons';
import type { IKernelView } from './state';
import {
  formatBytes,
  formatTime,
  freedShort,
  canRecompute,
  hibernationNotes,
  recomputeNotes,
  sessionNames,
  stateLabel,
  summaryText
} from './state';
import type { HibernationStore } from './store';

export class HibernationPanel extends Widget {
  constructor(
    private readonly _store: HibernationStore,
    private readonly _actions: HibernationActions
  ) {
    super();
    this.id = 'kernelhib-panel';
    this.addClass('jp-kernelhib-Panel');
    this.title.icon = hibernatedIcon;
    this.title.caption = 'Kernel Hibernation';

    const header = document.createElement('header');
    const heading = document.createElement('h2');
    heading.textContent = 'Kernel Hibernation';
    const refresh = document.createElement('button');
    refresh.className = 'jp-ToolbarButtonComponent jp-kernelhib-Refresh';
    refresh.title = 'Refresh the list of kernels';
    refreshIcon.element({ container: refresh });
    refresh.addEventListener('click', () => void this._refresh());
    header.append(heading, refresh);
    this._summary.className = 'jp-kernelhib-Summary';
    this._list.className = 'jp-kernelhib-Kernels';
    this.node.append(header, this._summary, this._list);
    _store.changed.connect(this._render, this);
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._render();
    void this._refresh();
  }

  private async _refresh(): Promise<void> {
    try {
      await this._store.refresh();
    } catch (error) {
      this._summary.textContent = `Could not list the kernels: ${error}`;
    }
  }

  private _render(): void {
    if (!this.isVisible) {
      return;
    }
    const views = [...this._store.views];
    this._summary.textContent = summaryText(views);
    this._list.replaceChildren(...views.map(view => this._item(view)));
  }

  /** One kernel: its notebooks and state, its numbers, notes on its hibernation, its actions. */
  private _item(view: IKernelView): HTMLLIElement {
    const item = document.createElement('li');
    item.className = 'jp-kernelhib-Kernel';
    item.dataset.kernelId = view.id;
    item.dataset.kernelhibState = view.state;

    const title = document.createElement('div');
    title.className = 'jp-kernelhib-Kernel-title';
    const name = document.createElement('span');
    name.className = 'jp-kernelhib-Kernel-name';
    const names = sessionNames(this._store.paths(view.id));
    name.textContent =
      names.join(', ') || `${view.name} ${view.id.slice(0, 8)}`;
    name.title =
      `${this._store.paths(view.id).join('\n')}\nkernel ${view.id}`.trim();
    const state = document.createElement('span');
    state.className = 'jp-kernelhib-Kernel-state';
    state.textContent = stateLabel(view);
    state.title = view.error;
    title.append(name, state);

    const hibernated = view.state === 'hibernated';
    const facts = document.createElement('dl');
    const fact = (term: string, value: string, hint = '') => {
      const dt = document.createElement('dt');
      dt.textContent = term;
      const dd = document.createElement('dd');
      dd.textContent = value;
      dd.title = hint;
      facts.append(dt, dd);
    };
    const memory = hibernated
      ? [`0 B, ${freedShort(view)} freed`, '']
      : view.state === 'running' && view.memoryBytes !== null
        ? [
            `${formatBytes(view.memoryBytes)} in use`,
            "Private resident memory of the kernel's processes: what hibernating it would free"
          ]
        : ['—', ''];
    fact('Memory', memory[0], memory[1]);
    fact('Image', hibernated ? formatBytes(view.imageBytes) : '—');
    fact('Engine', hibernated ? view.engine : '—', view.fallbackReason);
    fact(
      'Last activity',
      formatTime(view.lastActivity, new Date()),
      view.lastActivity
    );

    const actions = document.createElement('div');
    actions.className = 'jp-kernelhib-Kernel-actions';
    if (canRecompute(view)) {
      const recompute = this._button('Recompute', () =>
        this._actions.recompute(view.id)
      );
      recompute.classList.add('jp-kernelhib-Recompute');
      recompute.title = `Run cells ${view.recompute?.run.map(n => `[${n}]`).join(', ')} again to re-create the lost variables`;
      actions.append(recompute);
    }
    if (view.state === 'running') {
      actions.append(
        this._button('Hibernate', () => this._actions.hibernate(view.id))
      );
    } else if (hibernated) {
      actions.append(this._button('Wake', () => this._actions.wake(view.id)));
    }
    actions.append(
      this._button('Discard', () => this._actions.discard(view.id))
    );

    const notes = [
      ...(hibernated ? hibernationNotes(view) : []),
      ...recomputeNotes(view.recompute, new Date())
    ];
    const note = document.createElement('p');
    note.className = 'jp-kernelhib-Kernel-notes';
    note.textContent = notes.join('\n');
    note.hidden = notes.length === 0;

    item.append(title, facts, note, actions);
    return item;
  }

  private _button(
    label: string,
    action: () => Promise<void>
  ): HTMLButtonElement {
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = label;
    button.addEventListener('click', () => void action());
    return button;
  }

  private readonly _summary = document.createElement('p');
  private readonly _list = document.createElement('ul');
}
