import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { errorText } from './model';

/** The path of the Mesh API below the server's base URL. */
export const API_NAMESPACE = 'jupyter-mesh/api';

/**
 * Call the Mesh server extension: the one way the frontend talks to the server.
 *
 * @param endPoint - the route below `jupyter-mesh/api/`, e.g. `meshes/local-1234`
 * @param init - the fetch options (method, body)
 * @returns the parsed JSON reply
 * @throws ServerConnection.ResponseError carrying the server's message on an HTTP error,
 *   ServerConnection.NetworkError when the server cannot be reached
 */
export async function requestAPI<T>(
  endPoint = '',
  init: RequestInit = {}
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, API_NAMESPACE, endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    // marked, so that what an action says can tell a server that is down (the
    // browser's own words are "Failed to fetch", "Load failed"...) from other errors
    throw Object.assign(new ServerConnection.NetworkError(error as TypeError), {
      unreachable: true
    });
  }
  const text = await response.text();
  let data: any = text;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      // not JSON (a proxy's error page): keep the text for the message
    }
  }
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response, errorText(response, data));
  }
  return data as T;
}

/** A JSON request body with its method. */
export function jsonInit(method: string, body?: unknown): RequestInit {
  return {
    method,
    body: body === undefined ? undefined : JSON.stringify(body)
  };
}
