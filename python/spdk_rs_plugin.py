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


def spdk_rpc_plugin_initialize(subparsers):
    # bdev_ro: a read-only view of any bdev.
    def bdev_ro_create(args):
        _print(args.client.bdev_ro_create(base_bdev_name=args.base_bdev_name,
                                          name=args.name, uuid=args.uuid))

    p = subparsers.add_parser('bdev_ro_create', help='Create a read-only bdev over a base bdev')
    p.add_argument('base_bdev_name', help='base bdev name, alias or UUID')
    p.add_argument('-n', '--name', help='name of the read-only bdev')
    p.add_argument('-u', '--uuid', help='UUID of the read-only bdev')
    p.set_defaults(func=bdev_ro_create)

    def bdev_ro_delete(args):
        _print(args.client.bdev_ro_delete(name=args.name))

    p = subparsers.add_parser('bdev_ro_delete', help='Delete a read-only bdev')
    p.add_argument('name', help='read-only bdev name')
    p.set_defaults(func=bdev_ro_delete)

    # NBD server.
    def nbd_server_start(args):
        _print(args.client.nbd_server_start(listen=args.listen,
                                            allow_remote=True if args.allow_remote else None))

    p = subparsers.add_parser('nbd_server_start', help='Start the NBD server')
    p.add_argument('listen', help='unix:PATH or HOST:PORT')
    p.add_argument('--allow-remote', action='store_true',
                   help='allow a non-loopback TCP address')
    p.set_defaults(func=nbd_server_start)

    def nbd_server_stop(args):
        _print(args.client.nbd_server_stop())

    p = subparsers.add_parser('nbd_server_stop', help='Stop the NBD server (exports stay)')
    p.set_defaults(func=nbd_server_stop)

    def nbd_export_add(args):
        _print(args.client.nbd_export_add(bdev_name=args.bdev_name, name=args.name,
                                          writable=False if args.read_only else None))

    p = subparsers.add_parser('nbd_export_add', help='Export a bdev over NBD')
    p.add_argument('bdev_name', help='bdev name, alias or UUID')
    p.add_argument('-n', '--name', help='export name (default: the bdev name)')
    p.add_argument('-r', '--read-only', action='store_true', help='export read-only')
    p.add_argument('-w', '--writable', action='store_true',
                   help='export writable (the default; a read-only bdev is always exported read-only)')
    p.set_defaults(func=nbd_export_add)

    def nbd_export_remove(args):
        _print(args.client.nbd_export_remove(name=args.name))

    p = subparsers.add_parser('nbd_export_remove', help='Remove an NBD export')
    p.add_argument('name', help='export name')
    p.set_defaults(func=nbd_export_remove)

    def nbd_get_exports(args):
        _print(args.client.nbd_get_exports())

    p = subparsers.add_parser('nbd_get_exports', help='List NBD exports')
    p.set_defaults(func=nbd_get_exports)

    # Error bdev options of ours, on top of SPDK's bdev_error_inject_error.
    def bdev_error_inject_error_ext(args):
        _print(args.client.bdev_error_inject_error(
            name=args.name, io_type=args.io_type, error_type=args.error_type,
            num=args.num, after=args.after, forever=True if args.forever else None,
            offset_blocks=args.offset_blocks, num_blocks=args.num_blocks))

    p = subparsers.add_parser('bdev_error_inject_error_ext',
                              help='bdev_error_inject_error with our options (drop_writes, after N)')
    p.add_argument('name', help='error bdev name')
    p.add_argument('io_type', choices=['clear', 'read', 'write', 'unmap', 'flush',
                                       'write_zeroes', 'reset', 'all'])
    p.add_argument('error_type', choices=['failure', 'drop_writes'])
    p.add_argument('-n', '--num', type=int, help='number of I/Os to affect (default 1)')
    p.add_argument('-a', '--after', type=int, help='let this many matching I/Os through first')
    p.add_argument('-f', '--forever', action='store_true', help='never stop affecting I/O')
    p.add_argument('--offset-blocks', type=int, help='only I/O touching this range (start)')
    p.add_argument('--num-blocks', type=int, help='only I/O touching this range (length)')
    p.set_defaults(func=bdev_error_inject_error_ext)

    # lvol: retry policy for I/O that needs a missing external snapshot (degraded esnap clones).
    def bdev_lvol_set_esnap_retry(args):
        _print(args.client.bdev_lvol_set_esnap_retry(retries=args.retries,
                                                     delay_ms=args.delay_ms))

    p = subparsers.add_parser('bdev_lvol_set_esnap_retry',
                              help='Set how often and how long I/O waits for a missing esnap')
    p.add_argument('-r', '--retries', type=int, help='number of retries')
    p.add_argument('-d', '--delay-ms', type=int, help='delay between retries in ms')
    p.set_defaults(func=bdev_lvol_set_esnap_retry)

    def bdev_lvol_get_esnap_retry(args):
        _print(args.client.bdev_lvol_get_esnap_retry())

    p = subparsers.add_parser('bdev_lvol_get_esnap_retry',
                              help='Show the esnap retry policy')
    p.set_defaults(func=bdev_lvol_get_esnap_retry)

    # NBD client bdev: a bdev backed by an export of any NBD server.
    # Longhorn's fragmap: which clusters of a range an lvol owns.
    def bdev_lvol_get_fragmap(args):
        _print(args.client.bdev_lvol_get_fragmap(name=args.name, offset=args.offset,
                                                 size=args.size))

    p = subparsers.add_parser('bdev_lvol_get_fragmap',
                              help='Bitmap of the clusters an lvol owns (base64, LSB first)')
    p.add_argument('name', help='lvol bdev name, alias or UUID')
    p.add_argument('--offset', type=int, help='start in bytes (a cluster multiple; default 0)')
    p.add_argument('--size', type=int,
                   help='length in bytes (a cluster multiple; default: to the end)')
    p.set_defaults(func=bdev_lvol_get_fragmap)

    def bdev_nbd_client_create(args):
        _print(args.client.bdev_nbd_client_create(
            name=args.name, address=args.address, export=args.export, uuid=args.uuid,
            read_only=True if args.read_only else None,
            reconnect_attempts=args.reconnect_attempts,
            reconnect_delay_ms=args.reconnect_delay_ms,
            io_timeout_ms=args.io_timeout_ms, num_connections=args.num_connections,
            background_connect=True if args.background_connect else None))

    p = subparsers.add_parser('bdev_nbd_client_create',
                              help='Create a bdev over an NBD export (unix:PATH or HOST:PORT)')
    p.add_argument('name', help='bdev name')
    p.add_argument('address', help='unix:PATH or HOST:PORT of the NBD server')
    p.add_argument('export', help='export name ("" for the default export)')
    p.add_argument('-u', '--uuid', help='bdev UUID (give the same one on every re-create)')
    p.add_argument('-r', '--read-only', action='store_true', help='refuse writes')
    p.add_argument('--reconnect-attempts', type=int,
                   help='attempts after a lost connection before hot-removal')
    p.add_argument('--reconnect-delay-ms', type=int, help='delay between attempts')
    p.add_argument('--io-timeout-ms', type=int, help='longest wait for a reply')
    p.add_argument('-c', '--num-connections', type=int,
                   help='connections when the server allows several')
    p.add_argument('-b', '--background-connect', action='store_true',
                   help='succeed even if the server is away; connect in the background')
    p.set_defaults(func=bdev_nbd_client_create)

    def bdev_nbd_client_delete(args):
        _print(args.client.bdev_nbd_client_delete(name=args.name))

    p = subparsers.add_parser('bdev_nbd_client_delete', help='Delete an NBD client bdev')
    p.add_argument('name', help='bdev name')
    p.set_defaults(func=bdev_nbd_client_delete)

    def bdev_nbd_client_get(args):
        _print(args.client.bdev_nbd_client_get(name=args.name))

    p = subparsers.add_parser('bdev_nbd_client_get',
                              help='List NBD client bdevs with their connection state')
    p.add_argument('-b', '--name', help='only this client')
    p.set_defaults(func=bdev_nbd_client_get)
