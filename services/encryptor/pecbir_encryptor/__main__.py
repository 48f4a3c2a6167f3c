from pecbir_encryptor.cli import main

raise SystemExit(main())
