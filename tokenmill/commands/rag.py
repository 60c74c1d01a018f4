"""`tokenmill rag ingest DIR --collection NAME`: chunk, embed and store text/Markdown files."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rag", help="Build RAG collections for the gateway.")
    sub = parser.add_subparsers(dest="rag_command", metavar="ACTION", required=True)
    ingest = sub.add_parser("ingest", help="Ingest a folder of .md/.txt/.rst files; files that "
                            "changed since the last ingest have their chunks replaced.")
    ingest.add_argument("dir", metavar="DIR", help="Folder of documents.")
    ingest.add_argument("--collection", required=True, help="Collection name.")
    where = ingest.add_mutually_exclusive_group()
    where.add_argument("--config", help="Gateway config whose rag.dir holds the collections.")
    where.add_argument("--rag-dir", help="Folder holding the collections (default: "
                       "rag_collections, as in the gateway config's default).")
    ingest.add_argument("--chunk-chars", type=int, default=800, help="Largest chunk, characters.")
    ingest.add_argument("--prune", action="store_true",
                        help="Also drop chunks of files no longer in DIR.")
    ingest.set_defaults(func=ingest_command)


def ingest_command(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from tokenmill.errors import ConfigError

    if args.chunk_chars < 100:
        raise ConfigError(f"--chunk-chars={args.chunk_chars} must be at least 100",
                          param="chunk_chars")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenmill.gateway.config import RagSection, load_config
    from tokenmill.gateway.embeddings import load_embedder
    from tokenmill.gateway.rag_store import RagStore

    model_path = None
    if args.config:
        config = load_config(args.config)
        root, model_path = config.rag.dir, config.embeddings.model_path
    else:
        root = args.rag_dir or RagSection().dir
    embedder = load_embedder(model_path)
    collection = RagStore(root, embedder.dim).collection(args.collection)
    report = collection.ingest(Path(args.dir), embedder, max_chars=args.chunk_chars,
                               prune=args.prune)
    print(f"collection {args.collection!r} in {root}: {report.num_files_added} added, "
          f"{report.num_files_changed} changed, {report.num_files_unchanged} unchanged, "
          f"{report.num_files_removed} removed; {report.num_chunks} chunks")
    return 0
