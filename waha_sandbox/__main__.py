from waha_sandbox.app import main

main()
