/**
 * The notebook toolbar button: hibernates the notebook's kernel, or wakes it;
 * its icon, label and tooltip show the kernel's hibernation state.
 */
import type { NotebookPanel } from '@jupyterlab/notebook';
import type { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';
import type { HibernationActions } from './actions';
import {
  hibernatedIcon,
  hibernateIcon,
  transitionIcon,
  wakingIcon
} from './icons';
import type { IButtonLook } from './state';
import { buttonLook, viewFromModel } from './state';
import type { HibernationStore } from './store';

const ICONS: Record<IButtonLook['icon'], LabIcon> = {
  hibernate: hibernateIcon,
  hibernating: transitionIcon,
  hibernated: hibernatedIcon,
  waking: wakingIcon
};

export class HibernationButton extends Widget {
  constructor(
    private readonly _panel: NotebookPanel,
    private readonly _store: HibernationStore,
    private readonly _actions: HibernationActions
  ) {
    super();
    this.addClass('jp-kernelhib-ToolbarItem');
    this._button.className = 'jp-ToolbarButtonComponent jp-kernelhib-Button';
    this._button.type = 'button';
    this._icon.className = 'jp-kernelhib-Button-icon';
    this._label.className = 'jp-kernelhib-Button-label';
    this._button.append(this._icon, this._label);
    this.node.appendChild(this._button);
    this._button.addEventListener('click', () => void this._click());
    _store.changed.connect(this._render, this);
    _panel.sessionContext.kernelChanged.connect(this._render, this);
    this._render();
  }

  private get _kernelId(): string | undefined {
    return this._panel.sessionContext.session?.kernel?.id;
  }

  private _look(): IButtonLook {
    const kernel = this._panel.sessionContext.session?.kernel;
    if (!kernel) {
      return buttonLook(undefined);
    }
    // A kernel the store has not heard of yet simply runs.
    return buttonLook(
      this._store.view(kernel.id) ??
        viewFromModel({ id: kernel.id, name: kernel.name })
    );
  }

  private async _click(): Promise<void> {
    const kernelId = this._kernelId;
    const { action } = this._look();
    if (kernelId === undefined || action === null) {
      return;
    }
    await (action === 'hibernate'
      ? this._actions.hibernate(kernelId)
      : this._actions.wake(kernelId));
  }

  private _render(): void {
    if (this.isDisposed) {
      return;
    }
    const look = this._look();
    const state = this._kernelId
      ? (this._store.view(this._kernelId)?.state ?? 'running')
      : 'none';
    this.node.dataset.kernelhibState = state;
    this._button.title = look.tooltip;
    this._button.setAttribute('aria-label', look.tooltip);
    this._button.disabled = look.action === null;
    this._label.textContent = look.label;
    ICONS[look.icon].element({ container: this._icon });
  }

  private readonly _button = document.createElement('button');
  private readonly _icon = document.createElement('span');
  private readonly _label = document.createElement('span');
}
