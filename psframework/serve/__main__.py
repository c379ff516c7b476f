from .cli import replica_main

replica_main()
