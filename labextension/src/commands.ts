/**
 * The ids of the Mesh sidebar's commands. Each is also in the command palette
 * (category "Mesh"); the sidebar's buttons run the same commands.
 */
export namespace CommandIDs {
  /** Show the Mesh sidebar. */
  export const open = 'jupyter-mesh:open';
  /** Re-read the meshes now. */
  export const refresh = 'jupyter-mesh:refresh';
  /** Start a local mesh; args: the `ILocalOptions` fields (default: the settings). */
  export const startLocal = 'jupyter-mesh:start-local';
  /** Connect the server to a scheduler; args: `{address}` (else asked for). */
  export const connect = 'jupyter-mesh:connect';
  /** Scale a local mesh; args: `{id, counts}`. */
  export const scale = 'jupyter-mesh:scale';
  /** Stop (or disconnect) a mesh; args: `{id}` (default: the selected mesh). */
  export const stop = 'jupyter-mesh:stop';
  /** Open a mesh's Dask dashboard in a new browser tab; args: `{id}`. */
  export const openDashboard = 'jupyter-mesh:open-dashboard';
  /** Insert `%load_ext jupyter_mesh` / `%mesh connect ADDRESS` into the active notebook. */
  export const insertSnippet = 'jupyter-mesh:insert-snippet';
}
