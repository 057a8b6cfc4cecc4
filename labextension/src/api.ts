/**
 * kernelhib's REST calls: the kernels API with its hibernation fields, and
 * `POST /api/kernels/{id}/hibernate|wake|recompute`.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import type { IKernelModel } from './state';

/**
 * A refused or failed request: its HTTP status (0: the server was not reached),
 * the server's machine-readable `reason` code ('' when it sent none) and why.
 */
export class RequestError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly reason: string = ''
  ) {
    super(message);
  }
}

async function request<T>(
  settings: ServerConnection.ISettings,
  path: string,
  init: RequestInit = {}
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'api/kernels', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new RequestError(0, `the server could not be reached: ${error}`);
  }
  if (!response.ok) {
    // jupyter_server's JSON errors: {"message": ..., "reason": ...}
    const body = await response.json().catch(() => ({}));
    throw new RequestError(
      response.status,
      typeof body.message === 'string' ? body.message : response.statusText,
      typeof body.reason === 'string' ? body.reason : ''
    );
  }
  return (await response.json()) as T;
}

/** All kernels of the server. */
export function listKernels(
  settings: ServerConnection.ISettings
): Promise<IKernelModel[]> {
  return request<IKernelModel[]>(settings, '');
}

/** One kernel's model; a RequestError with status 404 if it is gone. */
export function getKernel(
  settings: ServerConnection.ISettings,
  kernelId: string
): Promise<IKernelModel> {
  return request<IKernelModel>(settings, encodeURIComponent(kernelId));
}

/**
 * Hibernate a kernel with the server's configured engine; `force` also
 * hibernates a busy one (its cell carries on after the wake).
 */
export function hibernateKernel(
  settings: ServerConnection.ISettings,
  kernelId: string,
  force: boolean
): Promise<IKernelModel> {
  return request<IKernelModel>(
    settings,
    `${encodeURIComponent(kernelId)}/hibernate`,
    { method: 'POST', body: JSON.stringify({ force }) }
  );
}

/** Wake a hibernated kernel (a no-op for a running one). */
export function wakeKernel(
  settings: ServerConnection.ISettings,
  kernelId: string
): Promise<IKernelModel> {
  return request<IKernelModel>(
    settings,
    `${encodeURIComponent(kernelId)}/wake`,
    { method: 'POST' }
  );
}

/** Run the cells that re-create what the kernel's last dill wake lost. */
export function recomputeKernel(
  settings: ServerConnection.ISettings,
  kernelId: string
): Promise<IKernelModel> {
  return request<IKernelModel>(
    settings,
    `${encodeURIComponent(kernelId)}/recompute`,
    { method: 'POST' }
  );
}
