from flux_triton.gateway.app import main

main()
