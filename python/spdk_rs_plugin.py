#  SPDX-License-Identifier: BSD-3-Clause
"""spdk-rpc plugin for the methods our target adds to SPDK's set.

Use: PYTHONPATH=python spdk-rpc --plugin spdk_rs_plugin METHOD ...

spdk-rpc imports the module named by --plugin and calls spdk_rpc_plugin_initialize(subparsers);
each command calls the method through the client (client.<method>(**params); parameters that
are None are dropped by the client).
"""

import json


def _print(obj):
    if isinstance(obj, str):
        print(obj)
    elif obj is not None:
        print(json.dumps(obj, indent=2))


def _arg(*flags, **options):
    """One argument of a command: what argparse's add_argument takes."""
    return flags, options


def _command(subparsers, name, help, *arguments, method=None, params=None):
    """Adds the command `name`, which calls the method of that name (or `method`).

    The method's parameters are `params(args)` when given; otherwise each argument under its
    own name, a flag that was not given (False) left out.
    """
    p = subparsers.add_parser(name, help=help)
    names = [p.add_argument(*flags, **options).dest for flags, options in arguments]

    def call(args):
        if params is not None:
            kwargs = params(args)
        else:
            kwargs = {n: getattr(args, n) for n in names}
            kwargs = {n: None if v is False else v for n, v in kwargs.items()}
        _print(getattr(args.client, method or name)(**kwargs))

    p.set_defaults(func=call)


def spdk_rpc_plugin_initialize(subparsers):
    # bdev_ro: a read-only view of any bdev.
    _command(subparsers, 'bdev_ro_create', 'Create a read-only bdev over a base bdev',
             _arg('base_bdev_name', help='base bdev name, alias or UUID'),
             _arg('-n', '--name', help='name of the read-only bdev'),
             _arg('-u', '--uuid', help='UUID of the read-only bdev'))
    _command(subparsers, 'bdev_ro_delete', 'Delete a read-only bdev',
             _arg('name', help='read-only bdev name'))

    # NBD server.
    _command(subparsers, 'nbd_server_start', 'Start the NBD server',
             _arg('listen', help='unix:PATH or HOST:PORT'),
             _arg('--allow-remote', action='store_true', help='allow a non-loopback TCP address'))
    _command(subparsers, 'nbd_server_stop', 'Stop the NBD server (exports stay)')
    _command(subparsers, 'nbd_export_add', 'Export a bdev over NBD',
             _arg('bdev_name', help='bdev name, alias or UUID'),
             _arg('-n', '--name', help='export name (default: the bdev name)'),
             _arg('-r', '--read-only', action='store_true', help='export read-only'),
             _arg('-w', '--writable', action='store_true',
                  help='export writable (the default; a read-only bdev is always exported read-only)'),
             params=lambda args: dict(bdev_name=args.bdev_name, name=args.name,
                                      writable=False if args.read_only else None))
    _command(subparsers, 'nbd_export_remove', 'Remove an NBD export',
             _arg('name', help='export name'))
    _command(subparsers, 'nbd_get_exports', 'List NBD exports')

    # Error bdev options of ours, on top of SPDK's bdev_error_inject_error.
    _command(subparsers, 'bdev_error_inject_error_ext',
             'bdev_error_inject_error with our options (drop_writes, after N)',
             _arg('name', help='error bdev name'),
             _arg('io_type', choices=['clear', 'read', 'write', 'unmap', 'flush',
                                      'write_zeroes', 'reset', 'all']),
             _arg('error_type', choices=['failure', 'drop_writes']),
             _arg('-n', '--num', type=int, help='number of I/Os to affect (default 1)'),
             _arg('-a', '--after', type=int, help='let this many matching I/Os through first'),
             _arg('-f', '--forever', action='store_true', help='never stop affecting I/O'),
             _arg('--offset-blocks', type=int, help='only I/O touching this range (start)'),
             _arg('--num-blocks', type=int, help='only I/O touching this range (length)'),
             method='bdev_error_inject_error')

    # lvol: retry policy for I/O that needs a missing external snapshot (degraded esnap clones).
    _command(subparsers, 'bdev_lvol_set_esnap_retry',
             'Set how often and how long I/O waits for a missing esnap',
             _arg('-r', '--retries', type=int, help='number of retries'),
             _arg('-d', '--delay-ms', type=int, help='delay between retries in ms'))
    _command(subparsers, 'bdev_lvol_get_esnap_retry', 'Show the esnap retry policy')

    # Longhorn's fragmap: which clusters of a range an lvol owns.
    _command(subparsers, 'bdev_lvol_get_fragmap',
             'Bitmap of the clusters an lvol owns (base64, LSB first)',
             _arg('name', help='lvol bdev name, alias or UUID'),
             _arg('--offset', type=int, help='start in bytes (a cluster multiple; default 0)'),
             _arg('--size', type=int,
                  help='length in bytes (a cluster multiple; default: to the end)'))

    # NBD client bdev: a bdev backed by an export of any NBD server.
    _command(subparsers, 'bdev_nbd_client_create',
             'Create a bdev over an NBD export (unix:PATH or HOST:PORT)',
             _arg('name', help='bdev name'),
             _arg('address', help='unix:PATH or HOST:PORT of the NBD server'),
             _arg('export', help='export name ("" for the default export)'),
             _arg('-u', '--uuid', help='bdev UUID (give the same one on every re-create)'),
             _arg('-r', '--read-only', action='store_true', help='refuse writes'),
             _arg('--reconnect-attempts', type=int,
                  help='attempts after a lost connection before hot-removal'),
             _arg('--reconnect-delay-ms', type=int, help='delay between attempts'),
             _arg('--io-timeout-ms', type=int, help='longest wait for a reply'),
             _arg('-c', '--num-connections', type=int,
                  help='connections when the server allows several'),
             _arg('-b', '--background-connect', action='store_true',
                  help='succeed even if the server is away; connect in the background'))
    _command(subparsers, 'bdev_nbd_client_delete', 'Delete an NBD client bdev',
             _arg('name', help='bdev name'))
    _command(subparsers, 'bdev_nbd_client_get',
             'List NBD client bdevs with their connection state',
             _arg('-b', '--name', help='only this client'))
